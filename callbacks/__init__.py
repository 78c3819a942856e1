"""Keras callbacks for face-recognition training: loss scaling, throughput, NPU placement."""
from callbacks.loss_scale import LossScaleMonitor
from callbacks.placement import NPUPlacement
from callbacks.throughput import ThroughputLogger
from callbacks.verification import VerificationCallback

__all__ = ["LossScaleMonitor", "NPUPlacement", "ThroughputLogger", "VerificationCallback"]
