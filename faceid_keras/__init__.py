"""faceid_keras: ArcFace face recognition in Keras (margin heads, backbones, the training model).

Importing it registers every class a saved model refers to, so `keras.models.load_model` needs no
`custom_objects`; it leaves the process environment (TensorFlow's flags) to the user.
"""
# Imported for registration too: a saved training model refers to the LR schedules of its optimizer.
from faceid_keras import backbones, schedules
from faceid_keras.heads import MarginHead
from faceid_keras.model import ArcFaceModel
from faceid_keras.verifier import FaceVerifier

__all__ = ["ArcFaceModel", "FaceVerifier", "MarginHead", "backbones", "schedules"]
