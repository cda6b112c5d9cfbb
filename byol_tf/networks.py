"""Encoders and the projector / predictor MLP.

Every encoder takes float32 images in [0, 1] of shape [B, S, S, 3], normalises them
itself with fixed ImageNet channel statistics, and returns a global-average-pooled
representation [B, d]. Normalising inside the model means an exported encoder takes
the same [0, 1] images as the training pipeline, with no preprocessing to forget.

Encoders (`network.encoder`), all built here from Keras layers: `small_convnet` (the CPU
demo), `resnet18_cifar` (basic blocks, CIFAR stem) and the bottleneck ResNets
`resnet50`, `resnet101`, `resnet152` and `resnet200` (ImageNet stem, v1.5 blocks, 1x-4x
wide) as the reference code builds them.

Layers carry explicit names, so variable paths are deterministic and unique within a
model: BYOL builds an online and a target copy and pairs their weights by position,
and LARS recognises biases and BatchNorm parameters by the substrings 'bias', 'beta'
and 'gamma' in a variable's path. No layer name here contains those substrings.

All BatchNorm layers follow `NetworkConfig`: Keras `momentum` is the reference's decay
(0.9), `epsilon` 1e-5, and `synchronized` averages batch statistics across replicas.
They are `FusedBatchNormalization`: Keras' layer, computed by TensorFlow's fused kernel on
feature maps. Saved `.keras` files hold standard Keras layers (`portable_copy`), so they
load without byol-tf.
"""

from __future__ import annotations

from typing import Callable

import keras
import tensorflow as tf

from byol_tf.config import NetworkConfig

# ImageNet channel statistics for images in [0, 1]; used for every dataset so that
# encoders are interchangeable and exported models share one input contract.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NORMALIZATION_LAYER_NAME = "normalize"

# ResNet-18 (BasicBlock): blocks per stage and the stage widths at width_multiplier 1.
RESNET18_BLOCKS = (2, 2, 2, 2)
RESNET18_WIDTHS = (64, 128, 256, 512)

# small_convnet: (filters at width_multiplier 1, stride) per conv layer.
SMALL_CONVNET_LAYERS = ((32, 1), (64, 2), (128, 2), (256, 2))

# Bottleneck ResNets (ImageNet stem, v1.5 blocks): blocks per stage, by encoder name.
BOTTLENECK_BLOCKS = {
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet152": (3, 8, 36, 3),
    "resnet200": (3, 24, 36, 3),
}
# Stage output widths and stem width at width_multiplier 1; a bottleneck's inner 1x1 and
# 3x3 convs are a quarter of its stage's width. The multiplier widens all of them, the
# stem included, as the reference's and SimCLR's do (torchvision's wide_resnet50_2
# widens only the inner convs, a different network).
BOTTLENECK_WIDTHS = (256, 512, 1024, 2048)
BOTTLENECK_STEM_WIDTH = 64
BOTTLENECK_DIVISOR = 4


def build_encoder(config: NetworkConfig, image_size: int, name: str = "encoder") -> keras.Model:
    """Builds the encoder named by `config.encoder`.

    Args:
        config: the network section of the experiment config.
        image_size: side S of the square input images [B, S, S, 3], values in [0, 1].
        name: the Keras model name.

    Returns:
        A functional `keras.Model` mapping [B, S, S, 3] images to [B, d]
        representations; `representation_dim(model)` gives d.

    Raises:
        ConfigError: (a ValueError) an invalid network section, e.g. an unknown
            `network.encoder` or a `network.width_multiplier` the encoder does not take.
    """
    config.validate("network")
    builders: dict[str, Callable[[NetworkConfig, int, str], keras.Model]] = {
        "small_convnet": _small_convnet,
        "resnet18_cifar": _resnet18_cifar,
        **{encoder: _bottleneck_resnet for encoder in BOTTLENECK_BLOCKS},
    }
    return builders[config.encoder](config, image_size, name)


def representation_dim(model: keras.Model) -> int:
    """Size d of the representation [B, d] that an encoder from `build_encoder` returns."""
    return int(model.outputs[0].shape[-1])


def build_mlp(
    hidden_dim: int,
    output_dim: int,
    config: NetworkConfig,
    name: str,
    input_dim: int | None = None,
) -> keras.Sequential:
    """Builds a BYOL projector or predictor: Linear -> BN -> ReLU -> Linear.

    As in the reference code, the hidden Dense keeps its bias and the output Dense has
    none, and the output has no BatchNorm (the loss normalises the output itself). The
    hidden bias is redundant before BN (its beta does the same job); the reference keeps
    it, and so do we, so that the two hold the same variables.

    Args:
        hidden_dim: width of the hidden layer (4096 in the paper).
        output_dim: output width (256 in the paper).
        config: the network section of the experiment config (BatchNorm settings).
        name: the Keras model name; it prefixes the variable paths.
        input_dim: when given, the weights are created now rather than on first call,
            so that variable paths do not depend on where the MLP is first called.

    Returns:
        A `keras.Sequential` mapping [B, input_dim] to [B, output_dim].
    """
    layers = [
        keras.layers.Dense(hidden_dim, name="linear1"),
        _batch_norm(config, "bn1"),
        keras.layers.ReLU(name="relu1"),
        keras.layers.Dense(output_dim, use_bias=False, name="linear2"),
    ]
    if input_dim is not None:
        layers.insert(0, keras.Input(shape=(input_dim,), name=f"{name}_input"))
    return keras.Sequential(layers, name=name)


@keras.saving.register_keras_serializable(package="byol_tf")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    """`keras.layers.BatchNormalization` that runs TensorFlow's fused kernel on [B, H, W, C].

    Keras 3 normalises with separate ops (moments, subtract, scale, shift; and their
    gradients); TensorFlow's `FusedBatchNormV3` does the same arithmetic in one kernel
    (oneDNN on CPU, cuDNN on GPU, fused by XLA too). Same variables, same statistics in
    float32 under mixed precision, the same moving-statistics update as Keras (with the
    biased batch variance: the kernel's own running variance is unbiased, so it is
    rescaled). Inputs the kernel does not cover (2-D heads, masks, BN synchronised across
    replicas, renormalisation, a channel axis other than the last) take Keras' path.
    """

    def _fusable(self, inputs, mask) -> bool:
        return (
            keras.backend.backend() == "tensorflow"
            and mask is None
            and not self.synchronized
            and not self.renorm
            and len(inputs.shape) == 4
            and self.axis in (-1, 3)
        )

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        x = tf.cast(inputs, tf.float32)
        channels = x.shape[-1]
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels], tf.float32)
        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels], tf.float32)
        if training and self.trainable:
            outputs, mean, unbiased_variance = tf.compat.v1.nn.fused_batch_norm(
                x, gamma, beta, epsilon=self.epsilon, is_training=True
            )
            count = tf.cast(tf.size(x) // channels, tf.float32)
            variance = tf.where(count > 1.0, unbiased_variance * ((count - 1.0) / count), tf.zeros_like(unbiased_variance))
            momentum = self.momentum
            self.moving_mean.assign(self.moving_mean * momentum + tf.cast(mean, self.moving_mean.dtype) * (1.0 - momentum))
            self.moving_variance.assign(
                self.moving_variance * momentum + tf.cast(variance, self.moving_variance.dtype) * (1.0 - momentum)
            )
        else:
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                x,
                gamma,
                beta,
                mean=tf.cast(self.moving_mean, tf.float32),
                variance=tf.cast(self.moving_variance, tf.float32),
                epsilon=self.epsilon,
                is_training=False,
            )
        return tf.cast(outputs, self.compute_dtype)


def portable_copy(model: keras.Model) -> keras.Model:
    """A copy of `model` with the same weights whose layers are all standard Keras layers
    (each `FusedBatchNormalization` a `keras.layers.BatchNormalization`, which computes the
    same): what byol-tf saves, so `keras.models.load_model` needs no byol-tf import."""

    def clone(layer):
        if isinstance(layer, FusedBatchNormalization):
            return keras.layers.BatchNormalization.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    copy = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy.set_weights(model.get_weights())
    return copy


def _batch_norm(config: NetworkConfig, name: str, gamma_initializer="ones") -> keras.layers.BatchNormalization:
    return FusedBatchNormalization(
        momentum=config.batchnorm_momentum,
        epsilon=config.batchnorm_epsilon,
        synchronized=config.sync_batchnorm,
        gamma_initializer=gamma_initializer,
        name=name,
    )


def _normalized_input(image_size: int) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    inputs = keras.Input(shape=(image_size, image_size, 3), name="images")
    # Constants, not weights: nothing to copy to the target or to exclude from LARS.
    normalized = keras.layers.Normalization(
        axis=-1,
        mean=list(IMAGENET_MEAN),
        variance=[std**2 for std in IMAGENET_STD],
        name=NORMALIZATION_LAYER_NAME,
    )(inputs)
    return inputs, normalized


def _conv_bn(
    x,
    filters: int,
    kernel_size: int,
    strides: int,
    config: NetworkConfig,
    prefix: str,
    relu=True,
    kernel_initializer="he_normal",
    gamma_initializer="ones",
):
    # No conv bias: the following BatchNorm's beta makes it redundant.
    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer=kernel_initializer,
        name=f"{prefix}_conv",
    )(x)
    x = _batch_norm(config, f"{prefix}_bn", gamma_initializer)(x)
    if relu:
        x = keras.layers.ReLU(name=f"{prefix}_relu")(x)
    return x


def _small_convnet(config: NetworkConfig, image_size: int, name: str) -> keras.Model:
    """Four conv3x3-BN-ReLU layers, 32-64-128-256 (x width), strides 1-2-2-2, then GAP.

    Sized for the CPU demo on 28x28 MNIST: the full-resolution first layer keeps thin
    strokes, three stride-2 layers bring 28 -> 4 so the last (widest) layer is cheap,
    and the receptive field (17 px) spans most of a digit. On 2 CPU cores one
    forward+backward pass of a 128 x 28 x 28 batch takes 0.1-0.15 s, about half the
    cost of a stride-1 fourth layer. d = 256 x width_multiplier.
    """
    inputs, x = _normalized_input(image_size)
    for index, (filters, strides) in enumerate(SMALL_CONVNET_LAYERS, start=1):
        x = _conv_bn(x, filters * config.width_multiplier, 3, strides, config, f"layer{index}")
    outputs = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, outputs, name=name)


def _basic_block(x, filters: int, strides: int, config: NetworkConfig, prefix: str):
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        # Projection shortcut (1x1 conv + BN) where the shape changes, as torchvision's.
        shortcut = _conv_bn(x, filters, 1, strides, config, f"{prefix}_shortcut", relu=False)
    x = _conv_bn(x, filters, 3, strides, config, f"{prefix}_1")
    x = _conv_bn(x, filters, 3, 1, config, f"{prefix}_2", relu=False)
    x = keras.layers.Add(name=f"{prefix}_add")([shortcut, x])
    return keras.layers.ReLU(name=f"{prefix}_out")(x)


def _resnet18_cifar(config: NetworkConfig, image_size: int, name: str) -> keras.Model:
    """ResNet-18 with the CIFAR stem: 3x3 stride-1 conv, no max-pool; d = 512 x width."""
    width = config.width_multiplier
    inputs, x = _normalized_input(image_size)
    # Small images: the ImageNet stem (7x7/2 conv + max-pool) would shrink 32 -> 8 at once.
    x = _conv_bn(x, RESNET18_WIDTHS[0] * width, 3, 1, config, "stem")
    for stage, (blocks, filters) in enumerate(zip(RESNET18_BLOCKS, RESNET18_WIDTHS), start=1):
        for block in range(1, blocks + 1):
            strides = 2 if stage > 1 and block == 1 else 1
            x = _basic_block(x, filters * width, strides, config, f"stage{stage}_block{block}")
    outputs = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, outputs, name=name)


def _fan_in_truncated_normal(kernel_size: int, in_channels: int) -> keras.initializers.Initializer:
    # The reference's conv init (haiku Conv2D's default): a normal of stddev 1/sqrt(fan_in),
    # re-drawn beyond two standard deviations, as Keras' TruncatedNormal also does.
    return keras.initializers.TruncatedNormal(stddev=(kernel_size * kernel_size * in_channels) ** -0.5)


def _bottleneck_conv_bn(x, filters: int, kernel_size: int, strides: int, config: NetworkConfig, prefix: str, **kwargs):
    initializer = _fan_in_truncated_normal(kernel_size, x.shape[-1])
    return _conv_bn(x, filters, kernel_size, strides, config, prefix, kernel_initializer=initializer, **kwargs)


def _bottleneck_block(x, filters: int, strides: int, project: bool, config: NetworkConfig, prefix: str):
    """1x1 -> 3x3 (stride here: v1.5) -> 1x1 (x4 wider), plus the shortcut, then ReLU."""
    shortcut = x
    if project:
        shortcut = _bottleneck_conv_bn(x, filters, 1, strides, config, f"{prefix}_shortcut", relu=False)
    inner = filters // BOTTLENECK_DIVISOR
    x = _bottleneck_conv_bn(x, inner, 1, 1, config, f"{prefix}_1")
    # v1.5: striding the 3x3 rather than the first 1x1 (v1) sees every input pixel.
    x = _bottleneck_conv_bn(x, inner, 3, strides, config, f"{prefix}_2")
    # A zero gamma makes the branch output 0, so the block starts as its shortcut.
    gamma = "zeros" if config.zero_init_residual else "ones"
    x = _bottleneck_conv_bn(x, filters, 1, 1, config, f"{prefix}_3", relu=False, gamma_initializer=gamma)
    x = keras.layers.Add(name=f"{prefix}_add")([shortcut, x])
    return keras.layers.ReLU(name=f"{prefix}_out")(x)


def _bottleneck_resnet(config: NetworkConfig, image_size: int, name: str) -> keras.Model:
    """ResNet-50/101/152/200 as the reference builds them; d = 2048 x width_multiplier.

    The ImageNet stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool), then four stages of v1.5
    bottleneck blocks (`BOTTLENECK_BLOCKS`, `BOTTLENECK_WIDTHS`), the first block of each
    with a projection shortcut (1x1 conv with the stage's stride + BN) and stride 2 from
    the second stage on, then global average pooling. Convs have no bias; "same" padding
    as the reference's. Conv kernels start as the reference's (haiku's Conv2D default):
    a normal of stddev 1/sqrt(fan_in) truncated at two standard deviations, rather than
    torchvision's He normal; every conv is followed by BatchNorm, which removes most of
    the difference. With `network.zero_init_residual` the last BN of each block starts
    at gamma 0.
    """
    width = config.width_multiplier
    inputs, x = _normalized_input(image_size)
    x = _bottleneck_conv_bn(x, BOTTLENECK_STEM_WIDTH * width, 7, 2, config, "stem")
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)
    stages = zip(BOTTLENECK_BLOCKS[config.encoder], BOTTLENECK_WIDTHS)
    for stage, (blocks, filters) in enumerate(stages, start=1):
        for block in range(1, blocks + 1):
            strides = 2 if stage > 1 and block == 1 else 1
            prefix = f"stage{stage}_block{block}"
            x = _bottleneck_block(x, filters * width, strides, block == 1, config, prefix)
    outputs = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, outputs, name=name)
