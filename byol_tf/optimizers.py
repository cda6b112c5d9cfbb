"""LARS optimizer (You et al. 2017) for Keras 3, as used to train BYOL.

Follows deepmind-research ``byol/utils/optimizers.py``: for each adapted
variable ``w`` with gradient ``g``::

    g = g + weight_decay * w
    g = g * (trust_coefficient * ||w|| / ||g||)   # 1 if either norm is 0
    m = momentum * m + g
    w = w - learning_rate * m

Excluded variables (biases and normalisation scales/offsets by default) skip
the first two lines: plain momentum SGD.
"""

import keras
from keras import ops

DEFAULT_EXCLUDE_FROM_ADAPTATION = ("bias", "beta", "gamma")


def _path(variable):
    # Keras variables have a unique path ("model/dense/bias"); raw tf.Variables only a name.
    return getattr(variable, "path", None) or variable.name


@keras.saving.register_keras_serializable(package="byol_tf")
class LARS(keras.optimizers.Optimizer):
    """Layer-wise adaptive rate scaling with momentum and L2 weight decay.

    Args:
        learning_rate: Float or ``keras.optimizers.schedules.LearningRateSchedule``.
        momentum: Momentum coefficient, in [0, 1).
        weight_decay: L2 coefficient added to the gradient *before* the trust
            ratio (coupled, as in the reference; not Keras' decoupled decay).
        trust_coefficient: LARS eta, scales ``||w|| / ||g||``.
        exclude_from_adaptation: Substrings of ``variable.path`` (e.g.
            ``"encoder/conv1_bn/gamma"``); a variable whose path contains any
            of them gets neither weight decay nor the trust ratio. ``None``
            means ``("bias", "beta", "gamma")`` (Dense/Conv biases,
            BatchNorm/LayerNorm offsets and scales); ``[]`` adapts every
            variable. The match is on the whole path, so model and layer
            names must not contain these substrings.
        **kwargs: Passed to ``keras.optimizers.Optimizer`` (``name``,
            ``clipnorm``, ...). Its own ``weight_decay`` is not used.
    """

    def __init__(
        self,
        learning_rate,
        momentum=0.9,
        weight_decay=0.0,
        trust_coefficient=1e-3,
        exclude_from_adaptation=None,
        **kwargs,
    ):
        # The base class applies *decoupled* decay for a non-None
        # weight_decay; ours is coupled, so the base must never see it.
        super().__init__(learning_rate=learning_rate, weight_decay=None, **kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {momentum}.")
        if weight_decay < 0.0:
            raise ValueError(f"`weight_decay` must be >= 0, got {weight_decay}.")
        if trust_coefficient <= 0.0:
            raise ValueError(f"`trust_coefficient` must be > 0, got {trust_coefficient}.")
        if isinstance(exclude_from_adaptation, str):
            raise ValueError("`exclude_from_adaptation` must be a list of strings, not a string.")
        self.momentum = momentum
        self.weight_decay_rate = weight_decay
        self.trust_coefficient = trust_coefficient
        self.exclude_from_adaptation = tuple(
            DEFAULT_EXCLUDE_FROM_ADAPTATION
            if exclude_from_adaptation is None
            else exclude_from_adaptation
        )

    def build(self, variables):
        super().build(variables)
        self.momentums = self.add_optimizer_variables(variables, "momentum")
        # Decided once here, so update_step branches in Python, not in-graph.
        self._adapt = [
            not any(p in _path(variable) for p in self.exclude_from_adaptation)
            for variable in variables
        ]

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        gradient = ops.cast(gradient, dtype)
        if self._adapt[index]:
            if self.weight_decay_rate:
                gradient = gradient + ops.cast(self.weight_decay_rate, dtype) * variable
            weight_norm = ops.sqrt(ops.sum(ops.square(variable)))
            grad_norm = ops.sqrt(ops.sum(ops.square(gradient)))
            # A zero norm (fresh zero-initialised weight, or no gradient)
            # would give a 0 or inf ratio; keep the update as is instead.
            trust_ratio = ops.where(
                ops.logical_and(weight_norm > 0.0, grad_norm > 0.0),
                ops.cast(self.trust_coefficient, dtype) * weight_norm / grad_norm,
                ops.cast(1.0, dtype),
            )
            gradient = gradient * trust_ratio
        m = self.momentums[index]
        self.assign(m, ops.cast(self.momentum, dtype) * m + gradient)
        self.assign_sub(variable, ops.cast(learning_rate, dtype) * m)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "weight_decay": self.weight_decay_rate,
                "trust_coefficient": self.trust_coefficient,
                "exclude_from_adaptation": list(self.exclude_from_adaptation),
            }
        )
        return config
