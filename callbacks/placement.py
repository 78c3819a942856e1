"""The callbacks a placement needs in `fit`, and the NPU one that makes every process start alike."""
from __future__ import annotations

import importlib

import keras

from callbacks.loss_scale import LossScaleMonitor
from faceid_keras.placement import Placement


class BroadcastInitialWeights(keras.callbacks.Callback):
    """Broadcasts `root_rank`'s trainable weights to all NPU processes when training begins.

    Each process initialises its own model; without the broadcast the replicas would train
    different networks. Uses `npu_device.distribute.broadcast`; `for_placement` adds this callback
    when several NPU ranks train together. The model must be built before `fit` (so its weights exist).
    """

    def __init__(self, root_rank: int = 0):
        super().__init__()
        self.root_rank = int(root_rank)

    def on_train_begin(self, logs=None):
        if not self.model.trainable_variables:
            raise ValueError(
                "BroadcastInitialWeights: the model has no trainable weights at train begin; build it "
                "(call it on a batch or give an input shape) before fit."
            )
        npu_device = importlib.import_module("npu_device")
        npu_device.distribute.broadcast(self.model.trainable_variables, root_rank=self.root_rank)


def for_placement(placement: Placement) -> list[keras.callbacks.Callback]:
    """The callbacks `placement` needs in `fit`: the initial weight broadcast on several NPUs, and a
    `LossScaleMonitor` when loss scaling is on."""
    result: list[keras.callbacks.Callback] = []
    if placement.broadcasts_initial_weights:
        result.append(BroadcastInitialWeights())
    if placement.loss_scaling:
        result.append(LossScaleMonitor())
    return result
