"""ArcFaceModel: a backbone plus a margin head, trained with plain `fit`, serving normalised embeddings."""
from __future__ import annotations

from typing import NamedTuple

import keras
import tensorflow as tf

from faceid_keras import backbones, compat
from faceid_keras.heads import HeadLoss, MarginHead


class ReplicaLoss(NamedTuple):
    """One replica's share of a step's loss (its sum over replicas is the global value)."""

    loss: tf.Tensor  # cross-entropy + regularisation losses: the `loss` metric
    objective: tf.Tensor  # what the step differentiates (with the coupled weight decay)
    replicas: int  # replicas in sync


@keras.saving.register_keras_serializable(package="faceid")
class ArcFaceModel(compat.BuiltInInitModel):
    """Face recognizer: `call(images)` gives L2-normalised float32 embeddings; `fit` trains the margin head.

    Images are pixels in [0, 255], uint8 or float, as decoded: the model's first layer applies
    insightface's (x/255 - 0.5)/0.5 on the device (as keras.applications models do), so input
    pipelines move a quarter of the bytes and a saved model takes images as they are.

    `backbone` is a name known to `faceid_keras.backbones.build` or any Keras model mapping images to
    vectors. Training minimises float32 softmax cross-entropy over the margin logits plus the
    model's regularisation losses, plus a coupled L2 weight decay 0.5 * weight_decay * sum(w^2) over
    all trainable weights (insightface's SGD weight_decay=5e-4; set 0 with a decoupled optimizer such
    as AdamW). The `loss` metric reports cross-entropy plus regularisation losses, without the decay
    term; `accuracy` is top-1 on the plain cosine logits (no margin), the prediction a user makes.
    Under tf.distribute each replica divides by the global batch and gradients are summed across
    replicas by the optimizer, so N replicas with global batch B step like one replica with batch B.

    Partial FC (`sample_rate` < 1, see `MarginHead.sample`): each training step draws the centres
    from the labels of the whole global batch and `optimizer.iterations`, identically on every
    replica, and gathers only those rows, so the centres' gradient is a `tf.IndexedSlices` over the
    sample. The training `loss` and `accuracy` are then over the sampled classes. The weight decay
    covers the sampled centres only, as in insightface's first Partial FC, which stepped only the
    sampled rows (its Partial FC v2 leaves decay to torch SGD, which decays every row). Keras SGD
    keeps one dense momentum, so an unsampled row still moves by its decaying momentum, as in v2
    (the first version kept the momentum of unsampled rows aside, frozen). `call`, `evaluate` and
    `predict` always use all centres. sample_rate=1.0 is the plain full head, step for step.

    `shard_centres=True` (Keras 3) splits the centres and their momentum across the replicas of
    the strategy the model is built in (see `sharded_heads.ShardedMarginHead`): each replica takes the distributed
    cross-entropy of the global batch against its shard and steps the shard itself with the
    compiled optimizer's learning rate and momentum, which must be keras.optimizers.SGD. Backbone
    and centre gradients are exactly those of the unsharded model; with sampling each shard
    samples within itself. Saved files hold the whole centres and load on any replica count.

    `margin` also takes "adaface" and "arcface_torch"; `subcenters` and
    `interclass_filtering_threshold` go to the head (see `MarginHead`). The head receives the
    backbone's raw embeddings, so AdaFace sees their norms; its statistics are model weights
    (saved, restored by backups) updated by training steps only.
    """

    def __init__(
        self,
        backbone: str | keras.Model = "iresnet50",
        num_classes: int | None = None,
        embedding_size: int = 512,
        margin: str | tuple = "arcface",
        scale: float = 64.0,
        input_shape=(112, 112, 3),
        norm: str = "batch",
        dropout: float = 0.0,
        weight_decay: float = 5e-4,
        sample_rate: float = 1.0,
        shard_centres: bool = False,
        subcenters: int = 1,
        interclass_filtering_threshold: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if num_classes is None:
            raise ValueError("ArcFaceModel needs num_classes (the number of identities in the training set).")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}.")
        if isinstance(backbone, str):
            backbone = backbones.build(backbone, input_shape, embedding_size, norm=norm, dropout=dropout)
        elif not isinstance(backbone, keras.Model):
            raise TypeError(
                f"backbone must be a name in {list(backbones.BACKBONES)} or a keras.Model, got {type(backbone)!r}."
            )
        if len(backbone.inputs) != 1 or len(backbone.outputs) != 1 or len(backbone.outputs[0].shape) != 2:
            raise ValueError(
                "backbone must be a keras.Model with one image input and one (batch, embedding) output."
            )
        self.backbone = backbone
        self.image_shape = tuple(backbone.inputs[0].shape[1:])
        self.embedding_size = int(backbone.outputs[0].shape[-1])
        self.num_classes = num_classes
        self.margin = margin
        self.scale = scale
        self.norm = norm
        self.dropout = dropout
        self.weight_decay = float(weight_decay)
        self.head = MarginHead(
            num_classes, margin=margin, scale=scale, sample_rate=sample_rate, shard_centres=shard_centres,
            subcenters=subcenters, interclass_filtering_threshold=interclass_filtering_threshold,
            name="margin_head",
        )
        self.sample_rate = self.head.sample_rate
        self.shard_centres = self.head.shard_centres
        self.subcenters = self.head.subcenters
        self.interclass_filtering_threshold = self.head.interclass_filtering_threshold
        self.pixel_scaling = keras.layers.Rescaling(2.0 / 255.0, offset=-1.0, name="pixel_scaling")
        self.normalize = keras.layers.UnitNormalization(dtype="float32", name="l2_normalize")
        self.head.build((None, self.embedding_size))
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy_tracker = self.head.accuracy_metric()
        self(tf.zeros((1,) + self.image_shape))

    def call(self, images, training=None):
        return self.normalize(self._embed(images, training=training))

    def _embed(self, images, training=None):
        """Backbone embeddings (not L2-normalised) of [0, 255] pixel images."""
        return self.backbone(self.pixel_scaling(images), training=training)

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy_tracker]

    def compile(self, optimizer=None, **kwargs):
        """Compiles; without an optimizer uses insightface's SGD(learning_rate=0.1, momentum=0.9)."""
        if optimizer is None:
            optimizer = keras.optimizers.SGD(learning_rate=0.1, momentum=0.9)
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config):
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def _forward(self, images, labels, training, stepped_centres=()) -> HeadLoss:
        """The head's loss for one replica's batch; training steps sample (Partial FC) at the
        optimizer's iteration count."""
        embeddings = self._embed(images, training=training)
        step = self.optimizer.iterations if training else None
        return self.head.loss(embeddings, labels, step, stepped_centres)

    def _objective(self, result: HeadLoss, variables) -> ReplicaLoss:
        """This replica's share of the loss and of the objective to differentiate: the one place
        that scales by the replica count (gradients are then summed across replicas).

        Cross-entropy sums over the global batch, regularisation losses and the coupled weight
        decay divided by the replicas; centre rows a replica steps alone (sharded) decay whole.
        """
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        global_batch = tf.cast(tf.shape(result.cross_entropy)[0] * replicas, "float32")
        loss = tf.reduce_sum(result.cross_entropy) / global_batch
        if result.global_cross_entropy is None:
            objective = loss
        else:
            everyone = result.global_cross_entropy
            objective = tf.reduce_sum(everyone) / tf.cast(tf.shape(everyone)[0], "float32")
        if self.losses:
            regularisation = tf.add_n([tf.cast(x, "float32") for x in self.losses]) / replicas
            loss, objective = loss + regularisation, objective + regularisation
        if self.weight_decay and variables is not None:
            rows = result.decay_rows
            decayed = [v for v in variables if rows is None or v is not self.head.centres]
            if rows is not None and self.head.centres_replicated:
                decayed.append(rows)
            decay = tf.add_n([tf.reduce_sum(tf.square(tf.cast(v, "float32"))) for v in decayed])
            if rows is not None and not self.head.centres_replicated:
                objective = objective + 0.5 * self.weight_decay * (decay / replicas + tf.reduce_sum(tf.square(rows)))
            else:
                objective = objective + 0.5 * self.weight_decay * decay / replicas
        return ReplicaLoss(loss, objective, replicas)

    def _track(self, loss: ReplicaLoss, result: HeadLoss):
        """Updates the metrics with this replica's loss share and the head's accuracy arguments."""
        batch = tf.shape(result.accuracy[0])[0]
        self.loss_tracker.update_state(loss.loss * loss.replicas, sample_weight=batch)
        self.accuracy_tracker.update_state(*result.accuracy)
        return compat.per_replica_logs({m.name: m.result() for m in self.metrics})

    @staticmethod
    def _unpack(data):
        images, labels, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if labels is None:
            raise ValueError("ArcFaceModel trains and evaluates on (images, labels) batches; got images only.")
        if sample_weight is not None:
            raise ValueError("ArcFaceModel does not support sample weights; pass (images, labels) batches.")
        return images, labels

    def train_step(self, data):
        """One step: the compiled optimizer steps the trainable variables, the head any centres it
        steps itself (sharded), both from one tape."""
        images, labels = self._unpack(data)
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            stepped = self.head.read_stepped_centres()
            tape.watch(stepped)
            result = self._forward(images, labels, training=True, stepped_centres=stepped)
            loss = self._objective(result, variables)
            objective = compat.scale_loss(self.optimizer, loss.objective)
        gradients = tape.gradient(objective, variables + stepped)
        split = len(variables)
        self.head.apply_gradients(self.optimizer, gradients[:split], variables, gradients[split:])
        return self._track(loss, result)

    def test_step(self, data):
        images, labels = self._unpack(data)
        result = self._forward(images, labels, training=False)
        return self._track(self._objective(result, None), result)

    def embedding_model(self) -> keras.Model:
        """A functional model [0, 255] pixel images -> L2-normalised float32 embeddings, without the
        class centres."""
        return embedding_model(self.backbone)

    def get_config(self):
        config = super().get_config()
        config.update(
            backbone=keras.saving.serialize_keras_object(self.backbone),
            num_classes=self.num_classes,
            embedding_size=self.embedding_size,
            margin=self.margin,
            scale=self.scale,
            input_shape=self.image_shape,
            norm=self.norm,
            dropout=self.dropout,
            weight_decay=self.weight_decay,
            sample_rate=self.sample_rate,
            shard_centres=self.shard_centres,
            subcenters=self.subcenters,
            interclass_filtering_threshold=self.interclass_filtering_threshold,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)


def embedding_model(backbone: keras.Model) -> keras.Model:
    """The serving model of a backbone: [0, 255] RGB pixels, scaled to [-1, 1] as insightface does,
    -> L2-normalised float32 embeddings (layers images, pixel_scaling, the backbone, l2_normalize)."""
    images = keras.Input(backbone.inputs[0].shape[1:], name="images")
    pixels = keras.layers.Rescaling(2.0 / 255.0, offset=-1.0, name="pixel_scaling")(images)
    embeddings = keras.layers.UnitNormalization(dtype="float32", name="l2_normalize")(backbone(pixels))
    return keras.Model(images, embeddings, name=f"{backbone.name}_embedding")


def backbone_of(model: keras.Model) -> keras.Model | None:
    """The backbone of an ArcFaceModel, or of a model holding exactly one nested model (the
    embedding model `embedding_model()` builds); None for any other model."""
    if isinstance(model, ArcFaceModel):
        return model.backbone
    nested = [layer for layer in getattr(model, "layers", []) if isinstance(layer, keras.Model)]
    return nested[0] if len(nested) == 1 else None
