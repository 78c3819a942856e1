"""Keras callbacks for face-recognition training: verification, loss scaling, throughput, and the
ones a placement needs (`for_placement`)."""
from callbacks.loss_scale import LossScaleMonitor
from callbacks.placement import BroadcastInitialWeights, for_placement
from callbacks.throughput import ThroughputLogger
from callbacks.verification import VerificationCallback

__all__ = ["BroadcastInitialWeights", "LossScaleMonitor", "ThroughputLogger", "VerificationCallback", "for_placement"]
