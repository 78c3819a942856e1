"""NPUPlacement: makes every NPU process start from the same weights."""
from __future__ import annotations

import importlib

import keras


class NPUPlacement(keras.callbacks.Callback):
    """Broadcasts `root_rank`'s trainable weights to all NPU processes when training begins.

    Each process initialises its own model; without the broadcast the replicas would train
    different networks. Uses `npu_device.distribute.broadcast`; `Placement.callbacks()` adds this
    callback when RANK_SIZE > 1. The model must be built before `fit` (so its weights exist).
    """

    def __init__(self, root_rank: int = 0):
        super().__init__()
        self.root_rank = int(root_rank)

    def on_train_begin(self, logs=None):
        if not self.model.trainable_variables:
            raise ValueError(
                "NPUPlacement: the model has no trainable weights at train begin; build it "
                "(call it on a batch or give an input shape) before fit."
            )
        npu_device = importlib.import_module("npu_device")
        npu_device.distribute.broadcast(self.model.trainable_variables, root_rank=self.root_rank)
