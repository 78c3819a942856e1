"""ArcFaceModel: a backbone plus a margin head, trained with plain `fit`, serving normalised embeddings."""
from __future__ import annotations

import keras
import tensorflow as tf
from faceid_keras import backbones, compat
from faceid_keras.heads import MarginHead


@keras.saving.register_keras_serializable(package="faceid")
class ArcFaceModel(keras.Model):
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
    the strategy the model is built in (see `MarginHead`): each replica takes the distributed
    cross-entropy of the global batch against its shard and steps the shard itself with the
    compiled optimizer's learning rate and momentum, which must be keras.optimizers.SGD. Backbone
    and centre gradients are exactly those of the unsharded model; with sampling each shard
    samples within itself. Saved files hold the whole centres and load on any replica count.
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
            name="margin_head",
        )
        self.sample_rate = self.head.sample_rate
        self.shard_centres = self.head.shard_centres
        self.pixel_scaling = keras.layers.Rescaling(2.0 / 255.0, offset=-1.0, name="pixel_scaling")
        self.normalize = keras.layers.UnitNormalization(dtype="float32", name="l2_normalize")
        self.head.build((None, self.embedding_size))
        self.loss_tracker = keras.metrics.Mean(name="loss")
        if self.shard_centres:  # no replica holds every class's cosine: the head gives hits
            self.accuracy_tracker = keras.metrics.Mean(name="accuracy")
        else:
            self.accuracy_tracker = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
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

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Builds the optimizer before `fit`/`evaluate` without averaging a batch over replicas.

        Keras's version (3.15) reduces the first (images, labels) batch across replicas to trace
        the model, which fails under MultiWorkerMirroredStrategy (a nested batch cannot be
        all-reduced). This model and its metrics are built in `__init__`, so without compiled
        losses or metrics only the optimizer is left to build.
        """
        compiled_extras = self._compile_loss is not None or self._compile_metrics is not None
        if self._distribute_strategy is None or compiled_extras:
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        with self.distribute_strategy.scope():
            self._symbolic_build()

    def _forward(self, images, labels, training, sample=False):
        """Per-replica (cross-entropy + regularisation) loss scaled for gradient summing, cosines,
        the labels they refer to, replicas, and the gathered centres when the head is sampled."""
        embeddings = self._embed(images, training=training)
        labels = tf.reshape(tf.cast(labels, "int32"), (-1,))
        centres = None
        if sample:
            index, labels = self.head.sample(labels, self.optimizer.iterations)
            centres = tf.gather(compat.variable_tensor(self.head.centres), index)
        cosine = self.head.cosine(embeddings, centres)
        logits = self.head.margin_logits(cosine, labels)
        cross_entropy = keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        global_batch = tf.cast(tf.shape(labels)[0] * replicas, "float32")
        loss = tf.reduce_sum(cross_entropy) / global_batch
        if self.losses:
            loss = loss + tf.add_n([tf.cast(x, "float32") for x in self.losses]) / replicas
        return loss, cosine, labels, replicas, centres

    def _sharded_forward(self, images, labels, training, shard, sample=False):
        """`_forward` with sharded centres: (loss, cross-entropy objective, head result, replicas).

        `loss` is this replica's share for the metric, as `_forward`'s; the objective holds the
        cross-entropy of the whole global batch over its true size, whose gradient through the
        head's distributed cross-entropy is this replica's exact part (see
        `MarginHead.sharded_cross_entropy`).
        """
        embeddings = self._embed(images, training=training)
        step = self.optimizer.iterations if sample else None
        result = self.head.sharded_cross_entropy(embeddings, labels, shard, step)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        local_batch = tf.cast(tf.shape(result.local_loss)[0] * replicas, "float32")
        loss = tf.reduce_sum(result.local_loss) / local_batch
        objective = tf.reduce_sum(result.loss) / tf.cast(tf.shape(result.loss)[0], "float32")
        if self.losses:
            regularisation = tf.add_n([tf.cast(x, "float32") for x in self.losses]) / replicas
            loss, objective = loss + regularisation, objective + regularisation
        return loss, objective, result, replicas

    def _sharded_train_step(self, images, labels):
        """train_step with sharded centres: the compiled optimizer steps every other variable, the
        head each replica's shard (SGD with the optimizer's learning rate and momentum).

        The coupled weight decay of the shard's rows (all, or the sampled ones) is not divided by
        the replicas: no other replica adds to that gradient. Under loss scaling a step with a
        non-finite gradient on any replica (the shards' included) is skipped everywhere: every
        replica then hands the optimizer non-finite gradients and leaves its shard alone.
        """
        self.head.check_optimizer(self.optimizer)
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            shard = self.head.read_shard()
            tape.watch(shard)
            loss, objective, result, replicas = self._sharded_forward(
                images, labels, training=True, shard=shard, sample=self.head.sampling
            )
            if self.weight_decay:
                decay = tf.add_n([tf.reduce_sum(tf.square(tf.cast(v, "float32"))) for v in variables])
                decay = decay / replicas + tf.reduce_sum(tf.square(result.rows))
                objective = objective + 0.5 * self.weight_decay * decay
            objective = compat.scale_loss(self.optimizer, objective)
        gradients = tape.gradient(objective, variables + [shard])
        gradients, shard_gradient = gradients[:-1], gradients[-1]
        finite = None
        if compat.is_loss_scale_optimizer(self.optimizer):
            finite = _all_finite(gradients + [shard_gradient])
            gradients = [_poison(g, finite) for g in gradients]
        self.head.apply_shard_gradient(shard_gradient, self.optimizer, finite)
        compat.apply_gradients(self.optimizer, gradients, variables)
        return self._track(loss, replicas, result.hits)

    def _track(self, loss, replicas, *accuracy):
        """Updates the metrics; `accuracy` is (labels, cosines), or (hits,) with sharded centres."""
        self.loss_tracker.update_state(loss * replicas, sample_weight=tf.shape(accuracy[0])[0])
        self.accuracy_tracker.update_state(*accuracy)
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
        images, labels = self._unpack(data)
        if self.shard_centres:
            return self._sharded_train_step(images, labels)
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            loss, cosine, labels, replicas, centres = self._forward(
                images, labels, training=True, sample=self.head.sampling
            )
            objective = loss
            if self.weight_decay:
                decayed = [v for v in variables if centres is None or v is not self.head.centres]
                if centres is not None:
                    decayed.append(centres)
                decay = tf.add_n([tf.reduce_sum(tf.square(tf.cast(v, "float32"))) for v in decayed])
                objective = objective + 0.5 * self.weight_decay * decay / replicas
            objective = compat.scale_loss(self.optimizer, objective)
        gradients = tape.gradient(objective, variables)
        compat.apply_gradients(self.optimizer, gradients, variables)
        return self._track(loss, replicas, labels, cosine)

    def test_step(self, data):
        images, labels = self._unpack(data)
        if self.shard_centres:
            loss, _, result, replicas = self._sharded_forward(
                images, labels, training=False, shard=self.head.read_shard()
            )
            return self._track(loss, replicas, result.hits)
        loss, cosine, labels, replicas, _ = self._forward(images, labels, training=False)
        return self._track(loss, replicas, labels, cosine)

    def embedding_model(self) -> keras.Model:
        """A functional model [0, 255] pixel images -> L2-normalised float32 embeddings, without the
        class centres."""
        images = keras.Input(self.image_shape, name="images")
        embeddings = self.backbone(self.pixel_scaling(images))
        embeddings = keras.layers.UnitNormalization(dtype="float32", name="l2_normalize")(embeddings)
        return keras.Model(images, embeddings, name=f"{self.backbone.name}_embedding")

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
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)


def _all_finite(gradients):
    """Whether every gradient is finite on every replica (one all-reduce of a flag)."""
    values = [g.values if isinstance(g, tf.IndexedSlices) else g for g in gradients if g is not None]
    bad = 1.0 - tf.cast(tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in values]), "float32")
    if tf.distribute.get_strategy().num_replicas_in_sync > 1:
        bad = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, bad)
    return tf.equal(bad, 0.0)


def _poison(gradient, finite):
    """`gradient` where `finite`, else NaN: the loss-scale optimizer then skips the step."""
    if gradient is None:
        return None
    poison = tf.where(finite, 0.0, float("nan"))
    if isinstance(gradient, tf.IndexedSlices):
        values = gradient.values + tf.cast(poison, gradient.dtype)
        return tf.IndexedSlices(values, gradient.indices, gradient.dense_shape)
    return gradient + tf.cast(poison, gradient.dtype)
