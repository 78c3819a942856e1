"""faceid_keras: ArcFace face recognition in Keras (margin heads, backbones, the training model)."""
import os

# TensorFlow reads these once, when it is first imported, so they are set before anything imports
# it. TF leaves oneDNN off on AMD CPUs, where turning it on trains about five times faster;
# `setdefault` keeps whatever the user exported.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

# Imported for registration too: a saved training model refers to the LR schedules of its optimizer.
from faceid_keras import backbones, schedules  # noqa: E402
from faceid_keras.heads import MarginHead  # noqa: E402
from faceid_keras.model import ArcFaceModel  # noqa: E402
from faceid_keras.verifier import FaceVerifier  # noqa: E402

__all__ = ["ArcFaceModel", "FaceVerifier", "MarginHead", "backbones", "schedules"]
