"""faceid_keras: ArcFace face recognition in Keras (margin heads, backbones, the training model)."""
from faceid_keras import backbones
from faceid_keras.heads import MarginHead
from faceid_keras.model import ArcFaceModel

__all__ = ["ArcFaceModel", "MarginHead", "backbones"]
