"""BYOL's normalised regression loss and a representation-collapse metric.

All functions are pure and compute in float32, so a mixed-precision model
still reports (and differentiates) its loss in full precision.
"""

import tensorflow as tf

# Floor on the squared norm, as in the BYOL reference: a zero vector stays
# zero instead of producing NaNs.
_EPSILON = 1e-12


def _normalize(x):
    return tf.math.l2_normalize(tf.cast(x, tf.float32), axis=-1, epsilon=_EPSILON)


def unit_rows(x):
    """Rows scaled to unit L2 norm, the same bits for equal rows wherever they sit.

    For comparisons that break exact ties (kNN votes, neighbour search): equal rows must
    stay equal. `tf.math.l2_normalize` multiplies by `rsqrt`, which TensorFlow's CPU kernels
    compute with a vectorised approximation on some CPUs (seen on an Intel Xeon with
    AVX-512) and exactly in the tail of the loop, so two equal rows of one batch can differ
    in the last bit (at d = 4 and d = 2048, for instance) and a tie is then broken by
    position. Square root and division are correctly rounded in every lane. Zero rows stay
    zero.

    Args:
        x: Tensor ``[..., dim]``.

    Returns:
        float32 tensor of the shape of ``x``.
    """
    x = tf.cast(x, tf.float32)
    norm = tf.sqrt(tf.reduce_sum(tf.square(x), axis=-1, keepdims=True))
    return tf.math.divide_no_nan(x, norm)


def regression_loss(prediction, target):
    """Normalised mean squared error between prediction and target.

    Equals ``||p/||p|| - z/||z|| ||^2 = 2 - 2 cos(p, z)``: 0 for vectors with
    the same direction, 4 for opposite ones, and invariant to their scale.

    Args:
        prediction: Tensor ``[batch, dim]``, the online network's prediction.
        target: Tensor ``[batch, dim]``, the target projection. The caller
            applies ``tf.stop_gradient`` to it.

    Returns:
        float32 tensor ``[batch]``, one loss per example.
    """
    cosine = tf.reduce_sum(_normalize(prediction) * _normalize(target), axis=-1)
    return 2.0 - 2.0 * cosine


def symmetric_loss(p1, p2, z1, z2):
    """BYOL's symmetrised loss: each view's prediction regresses the other's target.

    Args:
        p1: Online prediction of view 1, ``[batch, dim]``.
        p2: Online prediction of view 2, ``[batch, dim]``.
        z1: Target projection of view 1, ``[batch, dim]``; the caller wraps it
            in ``tf.stop_gradient``, since only the online network is trained
            by gradient.
        z2: Target projection of view 2, ``[batch, dim]``; same as ``z1``.

    Returns:
        float32 tensor ``[batch]``: ``regression_loss(p1, z2) + regression_loss(p2, z1)``.
    """
    return regression_loss(p1, z2) + regression_loss(p2, z1)


def collapse_std(z):
    """Standard deviation over the batch of L2-normalised vectors, mean over dims.

    Close to ``1 / sqrt(dim)`` for well-spread outputs and 0 when every input
    maps to the same vector, so a falling value flags representation collapse.

    Args:
        z: Tensor ``[batch, dim]``, e.g. online projections.

    Returns:
        float32 scalar tensor.
    """
    return tf.reduce_mean(tf.math.reduce_std(_normalize(z), axis=0))
