"""BYOLModel: online and target networks, the BYOL train step and the EMA target update.

The model is a plain `keras.Model`: `model.compile(optimizer=...)` then `model.fit(dataset)`
on batches of `{"view1", "view2", "label"}` (see `byol_tf.data`), on one device or inside a
`tf.distribute` strategy scope. Only `model.encoder` is kept after training.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from byol_tf import augment as augment_lib
from byol_tf import losses, schedules
from byol_tf.config import AugmentConfig


def _cross_replica_sum(values):
    """Sums tensors over replicas (identity outside a strategy), for global metrics."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return values
    return context.all_reduce(tf.distribute.ReduceOp.SUM, values)


def _projection_moments(projections):
    """Count, mean and sum of squared deviations (over the batch) of L2-normalised projections.

    Deviations from the part's own mean, not raw sums of squares: a nearly collapsed batch has
    a std hundreds of times below its mean, and E[z^2] - E[z]^2 would cancel away float32's
    digits. Parts (micro-batches, replicas) combine exactly with `_combine_moments`.
    """
    z = tf.math.l2_normalize(tf.cast(projections, tf.float32), axis=-1, epsilon=1e-12)
    mean = tf.reduce_mean(z, axis=0)
    return {
        "count": tf.cast(tf.shape(z)[0], tf.float32),
        "mean": mean,
        "m2": tf.reduce_sum(tf.square(z - mean), axis=0),
    }


def _combine_moments(a, b):
    """Moments of the union of two disjoint parts (Chan, Golub and LeVeque's pairwise update)."""
    if a is None:
        return b
    count = a["count"] + b["count"]
    delta = b["mean"] - a["mean"]
    share = b["count"] / count
    return {
        "count": count,
        "mean": a["mean"] + delta * share,
        "m2": a["m2"] + b["m2"] + tf.square(delta) * a["count"] * share,
    }


def _cross_replica_moments(moments):
    """Moments over the GLOBAL batch: global mean first, then deviations summed around it."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return moments
    totals = context.all_reduce(
        tf.distribute.ReduceOp.SUM, {"count": moments["count"], "sum": moments["mean"] * moments["count"]}
    )
    mean = totals["sum"] / totals["count"]
    m2 = context.all_reduce(
        tf.distribute.ReduceOp.SUM, moments["m2"] + moments["count"] * tf.square(moments["mean"] - mean)
    )
    return {"count": totals["count"], "mean": mean, "m2": m2}


def _collapse_std_from_moments(moments):
    """`losses.collapse_std` (population std over the batch, mean over dimensions)."""
    return tf.reduce_mean(tf.sqrt(moments["m2"] / moments["count"]))


def _global_collapse_std(projections):
    """`losses.collapse_std` over the GLOBAL batch, from moments combined across replicas."""
    return _collapse_std_from_moments(_cross_replica_moments(_projection_moments(projections)))


def _num_replicas() -> int:
    context = tf.distribute.get_replica_context()
    return 1 if context is None else context.num_replicas_in_sync


def ema_update(target_variables, online_variables, decay):
    """target <- decay * target + (1 - decay) * online, for every pair, in-graph.

    Runs as a cross-replica update so it is valid for mirrored variables whatever their
    aggregation mode (Keras creates BN moving statistics with aggregation "none").

    Args:
        target_variables: Keras variables of the target network (`BYOLModel.ema_pairs`).
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


def _split_micro_batches(data, count: int):
    """`count` equal slices, along the batch axis, of every tensor in the batch dict."""
    if count == 1:
        return [data]
    slices = {key: tf.split(value, count, axis=0) for key, value in data.items()}
    return [{key: slices[key][index] for key in data} for index in range(count)]


def _add(total, value):
    return value if total is None else tf.nest.map_structure(tf.add, total, value)


class _BatchNormStatistics:
    """Makes BN moving statistics step once per optimizer step under gradient accumulation.

    Every micro-batch starts from the step's statistics and the step keeps the mean of the
    micro-batches' results: momentum * old + (1 - momentum) * mean of the micro-batch moments.
    """

    def __init__(self, variables):
        self.variables = variables
        self.start = [tf.identity(variable.value) for variable in variables]
        self.total = None

    def begin_micro_batch(self):
        for variable, start in zip(self.variables, self.start):
            variable.assign(start)

    def end_micro_batch(self):
        self.total = _add(self.total, [tf.identity(variable.value) for variable in self.variables])

    def finish(self, count: int):
        for variable, total in zip(self.variables, self.total):
            variable.assign(total / count)


class BYOLModel(keras.Model):
    """BYOL (Grill et al. 2020) as a Keras model with a custom `train_step`.

    Online network: encoder -> projector -> predictor. Target network: encoder -> projector,
    a copy of the online ones at construction; then, as in the reference implementation,
    its *parameters* (kernels, biases, BatchNorm gamma / beta) are an exponential moving
    average of the online ones with decay tau from `schedules.tau`, and it runs its
    BatchNorm in training mode: each batch is normalised with its own statistics
    (synchronised across replicas like the online network's), and the target's moving
    statistics are its own, updated by its forward passes. The target gets no gradient
    (stop-gradient) and none of its variables is trainable; its layers stay trainable,
    because a Keras 3 BatchNormalization whose layer is frozen silently normalises with
    its moving statistics instead of the batch's.

    An optional linear probe on the stop-gradient representation trains beside BYOL so
    accuracy is visible during pretraining.

    Args:
        build_encoder: zero-argument callable returning a fresh encoder `keras.Model`
            (float32 images in [0, 1] -> representation [B, d]); called twice.
        build_projector: zero-argument callable returning a fresh projector MLP; called twice.
        build_predictor: zero-argument callable returning the predictor MLP.
        image_size: side of the square input views.
        total_steps: training length K of the tau schedule (steps).
        tau_base: target decay at step 0.
        num_classes: classes for the online linear probe, or None for no probe.
        gradient_accumulation_steps: each train step cuts its batch into this many
            micro-batches and applies their summed gradients once; BN moving statistics and
            the target EMA also step once. Without BN the update equals that of the whole
            batch; with BN each micro-batch normalises with its own statistics.
        augment: the view distributions, for batches whose augmentation finishes on the
            accelerator ({"crop1", "crop2", "params1", "params2"}, `augment.placement:
            device`); batches of {"view1", "view2"} need none.
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
        gradient_accumulation_steps: int = 1,
        augment: AugmentConfig | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.augment = augment
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
        self.gradient_accumulation_steps = int(gradient_accumulation_steps)
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
        self.projection_dim = int(projection.shape[-1])
        if self.probe is not None:
            self.probe.build((None, self.online_encoder.output.shape[-1]))
        for target, online in zip(self.target_weights, self.online_weights):
            target.assign(online)
        # The target is updated by EMA only: its variables are frozen, not its layers (a
        # frozen BatchNormalization layer would use moving statistics in training mode).
        for variable in self.target_weights:
            variable.trainable = False
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
        """Every variable of the online encoder and projector (the target's counterparts)."""
        return self.online_encoder.weights + self.online_projector.weights

    @property
    def target_weights(self):
        """Every variable of the target encoder and projector, in `online_weights`' order."""
        return self.target_encoder.weights + self.target_projector.weights

    def ema_pairs(self):
        """(target, online) parameter pairs the EMA updates: every online variable that is
        trained (kernels, biases, BN gamma / beta), not the BN moving statistics, which
        the target keeps for itself."""
        statistics = {id(variable) for variable in self.batch_norm_statistics}
        return [
            (target, online)
            for target, online in zip(self.target_weights, self.online_weights)
            if id(online) not in statistics
        ]

    @property
    def batch_norm_statistics(self):
        """Moving means and variances of every BatchNormalization layer, online and target."""
        return [variable for variable in self.weights if variable.name in ("moving_mean", "moving_variance")]

    @property
    def metrics(self):
        trackers = [self.loss_tracker, self.collapse_tracker]
        if self.probe is not None:
            trackers += [self.probe_loss_tracker, self.probe_accuracy]
        return trackers

    def call(self, images, training=False):
        """Online representation of `images` (what the kept encoder computes)."""
        return self.online_encoder(images, training=training)

    def tau(self, step):
        """The EMA decay at optimizer step `step` (cosine from tau_base to 1)."""
        return schedules.tau(step, self.total_steps, self.tau_base)

    def views(self, data):
        """The batch with its two views: as given, or finished here from `augment.host_views`'
        crops and parameters (augmentation placed on the device; inside `train_step` this
        runs batched in the compiled step on the accelerator)."""
        if "view1" in data:
            return data
        if self.augment is None:
            raise ValueError(
                "BYOLModel got crops to augment (augment.placement: device) but no augment config; "
                "pass augment=config.augment"
            )
        view1, view2 = augment_lib.device_views(data, self.augment)
        return {"view1": view1, "view2": view2, **({"label": data["label"]} if "label" in data else {})}

    def train_step(self, data):
        data = self.views(data)
        # Each replica sees its share of the global batch; gradients are summed across
        # replicas by the optimizer, so the loss is divided by the GLOBAL batch size.
        global_batch = tf.cast(tf.shape(data["view1"])[0] * _num_replicas(), tf.float32)
        trainable = self.trainable_variables

        accumulate = self.gradient_accumulation_steps
        statistics = _BatchNormStatistics(self.batch_norm_statistics) if accumulate > 1 else None
        gradients, sums, moments = None, None, None
        for micro_batch in _split_micro_batches(data, accumulate):
            if gradients is not None:
                # One micro-batch at a time, so only one holds activations in memory.
                with tf.control_dependencies(gradients):
                    micro_batch = tf.nest.map_structure(tf.identity, micro_batch)
            if statistics:
                statistics.begin_micro_batch()
            micro_gradients, micro_sums, micro_moments = self._gradients(micro_batch, global_batch, trainable)
            if statistics:
                statistics.end_micro_batch()
            gradients, sums = _add(gradients, micro_gradients), _add(sums, micro_sums)
            moments = _combine_moments(moments, micro_moments)
        if statistics:
            statistics.finish(accumulate)

        step = tf.convert_to_tensor(self.optimizer.iterations)
        tau = self.tau(step)
        self.optimizer.apply_gradients(zip(gradients, trainable))
        # A LossScaleOptimizer skips steps with non-finite gradients: the target stays too.
        tau = tf.where(self.optimizer.iterations > step, tau, tf.ones_like(tau))
        targets, onlines = zip(*self.ema_pairs())
        ema_update(targets, onlines, tau)

        sums = _cross_replica_sum(sums)
        self.loss_tracker.update_state(sums["loss"] / global_batch)
        self.collapse_tracker.update_state(_collapse_std_from_moments(_cross_replica_moments(moments)))
        if self.probe is not None:
            count = tf.maximum(sums["probe"]["count"], 1.0)
            self.probe_loss_tracker.update_state(sums["probe"]["loss"] / count)
            self.probe_accuracy.update_state(sums["probe"]["correct"] / count)
        logs = {metric.name: metric.result() for metric in self.metrics}
        logs["tau"] = tau
        logs["learning_rate"] = tf.cast(self.optimizer.learning_rate, tf.float32)
        return logs

    def target_projection(self, view):
        """Target network output for a view: BN on the batch's statistics (training mode, as
        the reference), updating the target's own moving statistics; no gradient."""
        return tf.stop_gradient(self.target_projector(self.target_encoder(view, training=True), training=True))

    def online_forward(self, view):
        """Online network on a view (training mode): (representation, projection, prediction)."""
        representation = self.online_encoder(view, training=True)
        projection = self.online_projector(representation, training=True)
        return representation, projection, self.predictor(projection, training=True)

    def _gradients(self, data, global_batch, trainable):
        """Gradients of one (micro-)batch's share of the loss, its summed metric terms, and the
        moments of its online projections (for the collapse metric).

        Everything after the networks runs in float32, whatever the dtype policy.
        """
        view1, view2 = data["view1"], data["view2"]
        target_z1, target_z2 = self.target_projection(view1), self.target_projection(view2)

        with tf.GradientTape() as tape:
            representation1, online_z1, prediction1 = self.online_forward(view1)
            _, _, prediction2 = self.online_forward(view2)
            per_example = losses.symmetric_loss(prediction1, prediction2, target_z1, target_z2)
            byol_loss_sum = tf.reduce_sum(per_example)
            total = byol_loss_sum / global_batch
            if self.probe is not None:
                probe_loss_sum, probe_correct, labelled = self._probe_terms(representation1, data.get("label"))
                total += probe_loss_sum / global_batch
            # Identity unless the optimizer is a LossScaleOptimizer (mixed_float16).
            scaled = self.optimizer.scale_loss(total)

        gradients = tape.gradient(scaled, trainable)
        sums = {"loss": byol_loss_sum}
        if self.probe is not None:
            sums["probe"] = {"loss": probe_loss_sum, "correct": probe_correct, "count": labelled}
        return gradients, sums, _projection_moments(online_z1)

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
