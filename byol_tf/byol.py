"""BYOLModel: online and target networks, the BYOL train step and the EMA target update.

The model is a plain `keras.Model`: `model.compile(optimizer=...)` then `model.fit(dataset)`
on batches of `{"view1", "view2", "label"}` (see `byol_tf.data`), on one device or inside a
`tf.distribute` strategy scope. Only `model.encoder` is kept after training.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from byol_tf import losses, schedules


def _cross_replica_sum(values):
    """Sums tensors over replicas (identity outside a strategy), for global metrics."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return values
    return context.all_reduce(tf.distribute.ReduceOp.SUM, values)


def _global_collapse_std(projections):
    """`losses.collapse_std` over the GLOBAL batch, from moments summed across replicas."""
    z = tf.math.l2_normalize(tf.cast(projections, tf.float32), axis=-1, epsilon=1e-12)
    moments = _cross_replica_sum(
        {
            "sum": tf.reduce_sum(z, axis=0),
            "sum_sq": tf.reduce_sum(tf.square(z), axis=0),
            "count": tf.cast(tf.shape(z)[0], tf.float32),
        }
    )
    mean = moments["sum"] / moments["count"]
    variance = tf.maximum(moments["sum_sq"] / moments["count"] - tf.square(mean), 0.0)
    return tf.reduce_mean(tf.sqrt(variance))


def _num_replicas() -> int:
    context = tf.distribute.get_replica_context()
    return 1 if context is None else context.num_replicas_in_sync


def ema_update(target_variables, online_variables, decay):
    """target <- decay * target + (1 - decay) * online, for every pair, in-graph.

    Runs as a cross-replica update so it is valid for mirrored variables whatever their
    aggregation mode (Keras creates BN moving statistics with aggregation "none").

    Args:
        target_variables: Keras variables of the target network.
        online_variables: Keras variables of the online network, in the same order.
        decay: scalar tau in [0, 1].
    """
    targets = [variable.value for variable in target_variables]
    onlines = [variable.value for variable in online_variables]

    def update(strategy, decay):
        def assign(target, online, decay):
            decay = tf.cast(decay, target.dtype)
            online = tf.cast(online, target.dtype)
            return target.assign(decay * target + (1.0 - decay) * online)

        for target, online in zip(targets, onlines):
            strategy.extended.update(target, assign, args=(online, decay), group=False)

    tf.__internal__.distribute.interim.maybe_merge_call(
        update, tf.distribute.get_strategy(), tf.convert_to_tensor(decay, tf.float32)
    )


class BYOLModel(keras.Model):
    """BYOL (Grill et al. 2020) as a Keras model with a custom `train_step`.

    Online network: encoder -> projector -> predictor. Target network: encoder -> projector,
    a copy of the online ones at construction, then an exponential moving average of them
    (all variables, BatchNorm moving statistics included) with decay from
    `schedules.target_decay`. An optional linear probe on the stop-gradient representation
    trains beside BYOL so accuracy is visible during pretraining.

    Args:
        build_encoder: zero-argument callable returning a fresh encoder `keras.Model`
            (float32 images in [0, 1] -> representation [B, d]); called twice.
        build_projector: zero-argument callable returning a fresh projector MLP; called twice.
        build_predictor: zero-argument callable returning the predictor MLP.
        image_size: side of the square input views.
        total_steps: training length K of the tau schedule (steps).
        tau_base: target decay at step 0.
        num_classes: classes for the online linear probe, or None for no probe.
    """

    def __init__(
        self,
        build_encoder,
        build_projector,
        build_predictor,
        image_size: int,
        total_steps: int,
        tau_base: float = 0.996,
        num_classes: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.image_size = image_size
        self.total_steps = int(total_steps)
        self.tau_base = float(tau_base)
        self.num_classes = num_classes

        self.online_encoder = build_encoder()
        self.online_projector = build_projector()
        self.predictor = build_predictor()
        self.target_encoder = build_encoder()
        self.target_projector = build_projector()
        self.probe = keras.layers.Dense(num_classes, name="online_probe") if num_classes else None

        # Build every part eagerly so variables exist before fit() (needed under
        # multi-worker strategies and for the weight copy below).
        images = keras.ops.zeros((1, image_size, image_size, 3))
        for encoder, projector in (
            (self.online_encoder, self.online_projector),
            (self.target_encoder, self.target_projector),
        ):
            projection = projector(encoder(images))
        self.predictor(projection)
        if self.probe is not None:
            self.probe.build((None, self.online_encoder.output.shape[-1]))
        for target, online in zip(self.target_weights, self.online_weights):
            target.assign(online)
        # The target is updated by EMA only.
        self.target_encoder.trainable = False
        self.target_projector.trainable = False
        # Every variable exists now; marking the model built stops Keras' symbolic build in
        # fit() under a strategy, which would call the model on the {"view1", ...} dict.
        self.built = True

        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.collapse_tracker = keras.metrics.Mean(name="collapse_std")
        self.probe_loss_tracker = keras.metrics.Mean(name="probe_loss")
        self.probe_accuracy = keras.metrics.Mean(name="probe_accuracy")

    @property
    def encoder(self) -> keras.Model:
        """The online encoder: the part users keep."""
        return self.online_encoder

    @property
    def online_weights(self):
        return self.online_encoder.weights + self.online_projector.weights

    @property
    def target_weights(self):
        return self.target_encoder.weights + self.target_projector.weights

    @property
    def metrics(self):
        trackers = [self.loss_tracker, self.collapse_tracker]
        if self.probe is not None:
            trackers += [self.probe_loss_tracker, self.probe_accuracy]
        return trackers

    def call(self, images, training=False):
        """Online representation of `images` (what the kept encoder computes)."""
        return self.online_encoder(images, training=training)

    def target_decay(self, step):
        return schedules.target_decay(step, self.total_steps, self.tau_base)

    def train_step(self, data):
        view1, view2 = data["view1"], data["view2"]
        labels = data.get("label")
        # Each replica sees its share of the global batch; gradients are summed across
        # replicas by the optimizer, so the loss is divided by the GLOBAL batch size.
        global_batch = tf.cast(tf.shape(view1)[0] * _num_replicas(), tf.float32)

        # Target outputs carry no gradient; BN runs in training mode as in the reference.
        target_z1 = tf.stop_gradient(self.target_projector(self.target_encoder(view1, training=True), training=True))
        target_z2 = tf.stop_gradient(self.target_projector(self.target_encoder(view2, training=True), training=True))

        with tf.GradientTape() as tape:
            representation1 = self.online_encoder(view1, training=True)
            online_z1 = self.online_projector(representation1, training=True)
            online_z2 = self.online_projector(self.online_encoder(view2, training=True), training=True)
            prediction1 = self.predictor(online_z1, training=True)
            prediction2 = self.predictor(online_z2, training=True)
            per_example = losses.symmetric_loss(prediction1, prediction2, target_z1, target_z2)
            byol_loss_sum = tf.reduce_sum(per_example)
            total = byol_loss_sum / global_batch
            if self.probe is not None:
                probe_loss_sum, probe_correct, labelled = self._probe_terms(representation1, labels)
                total += probe_loss_sum / global_batch
            # Identity unless the optimizer is a LossScaleOptimizer (mixed_float16).
            scaled = self.optimizer.scale_loss(total)

        trainable = self.trainable_variables
        gradients = tape.gradient(scaled, trainable)
        step = self.optimizer.iterations
        tau = self.target_decay(step)
        self.optimizer.apply_gradients(zip(gradients, trainable))
        ema_update(self.target_weights, self.online_weights, tau)

        self.loss_tracker.update_state(_cross_replica_sum(byol_loss_sum) / global_batch)
        self.collapse_tracker.update_state(_global_collapse_std(online_z1))
        if self.probe is not None:
            probe = _cross_replica_sum({"loss": probe_loss_sum, "correct": probe_correct, "count": labelled})
            count = tf.maximum(probe["count"], 1.0)
            self.probe_loss_tracker.update_state(probe["loss"] / count)
            self.probe_accuracy.update_state(probe["correct"] / count)
        logs = {metric.name: metric.result() for metric in self.metrics}
        logs["tau"] = tau
        logs["learning_rate"] = tf.cast(self.optimizer.learning_rate, tf.float32)
        return logs

    def _probe_terms(self, representation, labels):
        """Summed cross-entropy and correct count of the probe over labelled examples."""
        logits = tf.cast(self.probe(tf.stop_gradient(representation)), tf.float32)
        labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
        labelled = tf.cast(labels >= 0, tf.float32)  # -1 marks an unlabelled image
        safe_labels = tf.maximum(labels, 0)
        cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_labels, logits=logits)
        correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), safe_labels), tf.float32)
        return (
            tf.reduce_sum(cross_entropy * labelled),
            tf.reduce_sum(correct * labelled),
            tf.reduce_sum(labelled),
        )

    def test_step(self, data):
        raise TypeError(
            "BYOLModel has no validation loss; evaluate the encoder with byol_tf.evaluation instead."
        )
