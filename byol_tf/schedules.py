"""Schedules of BYOL: the target EMA decay (tau) and the learning rate.

Both follow the BYOL reference (Grill et al. 2020, Appendix J and
deepmind-research ``byol/utils/schedules.py``) and return float32 tensors for
python-int or tensor steps, so they work inside ``tf.function`` and XLA.
"""

import math
import numbers

import keras
import tensorflow as tf


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be an integer, got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")


def _check_float(name, value, low, high=math.inf):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be a number, got {value!r}.")
    if not low <= value <= high:
        raise ValueError(f"`{name}` must be in [{low}, {high}], got {value}.")


def tau(step, total_steps, tau_base):
    """EMA decay of the target network: ``tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2``.

    Rises from ``tau_base`` at step 0 to 1 at ``total_steps``; steps outside
    ``[0, total_steps]`` are clamped, so training past the plan keeps tau = 1.

    Args:
        step: Current step k, python int or integer/float tensor (e.g. int64).
        total_steps: Total number of training steps K, positive int or tensor.
        tau_base: the decay at step 0, in [0, 1], e.g. 0.996.

    Returns:
        float32 scalar tensor (or the shape of ``step``).

    Raises:
        ValueError: If a python ``total_steps`` or ``tau_base`` is out of range.
    """
    if not tf.is_tensor(total_steps):
        _check_int("total_steps", total_steps, 1)
    if not tf.is_tensor(tau_base):
        _check_float("tau_base", tau_base, 0.0, 1.0)
    total = tf.cast(total_steps, tf.float32)
    k = tf.clip_by_value(tf.cast(step, tf.float32), 0.0, total)
    base = tf.cast(tau_base, tf.float32)
    return 1.0 - (1.0 - base) * (tf.cos(math.pi * k / total) + 1.0) / 2.0


@keras.saving.register_keras_serializable(package="byol_tf")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to a peak, then cosine decay to a final value.

    ``lr(s) = peak * s / warmup_steps`` for ``s < warmup_steps``, then
    ``final + (peak - final) (1 + cos(pi t)) / 2`` with
    ``t = (s - warmup_steps) / (total_steps - warmup_steps)`` clamped to [0, 1].
    With ``final_learning_rate=0`` this is the BYOL reference schedule.

    Args:
        peak_learning_rate: Learning rate at the end of warm-up (already scaled
            by batch size, see ``scaled_learning_rate``).
        warmup_steps: Number of warm-up steps, >= 0.
        total_steps: Total number of training steps, >= ``warmup_steps`` and
            >= 1. If equal, warm-up fills the run and the rate drops to
            ``final_learning_rate`` after ``total_steps``.
        final_learning_rate: Learning rate at ``total_steps`` and after, in
            ``[0, peak_learning_rate]``.

    Raises:
        ValueError: If an argument is out of range; the message names it.
    """

    def __init__(
        self, peak_learning_rate, warmup_steps, total_steps, final_learning_rate=0.0
    ):
        _check_float("peak_learning_rate", peak_learning_rate, 0.0)
        _check_int("warmup_steps", warmup_steps, 0)
        _check_int("total_steps", total_steps, max(warmup_steps, 1))
        _check_float("final_learning_rate", final_learning_rate, 0.0, peak_learning_rate)
        self.peak_learning_rate = float(peak_learning_rate)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.final_learning_rate = float(final_learning_rate)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        peak, final = self.peak_learning_rate, self.final_learning_rate
        # The max(..., 1) only guard divisions by zero in degenerate schedules
        # (no warm-up, or no decay phase); they do not change any other value.
        warmup = peak * step / max(self.warmup_steps, 1)
        progress = (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        progress = tf.clip_by_value(progress, 0.0, 1.0)
        cosine = final + (peak - final) * 0.5 * (1.0 + tf.cos(math.pi * progress))
        return tf.where(step < self.warmup_steps, warmup, cosine)

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "final_learning_rate": self.final_learning_rate,
        }


def scaled_learning_rate(base_learning_rate, global_batch_size):
    """Learning rate scaled linearly with batch size: ``base * batch / 256``.

    Args:
        base_learning_rate: Learning rate for a batch of 256 (paper: 0.2-0.45).
        global_batch_size: Batch size summed over all replicas, > 0.

    Returns:
        Python float.

    Raises:
        ValueError: If ``global_batch_size`` is not a positive integer.
    """
    _check_int("global_batch_size", global_batch_size, 1)
    return base_learning_rate * global_batch_size / 256.0
