"""Tests for byol_tf.networks: shapes, architecture, BatchNorm settings, naming, seeding."""

import warnings

import keras
import numpy as np
import pytest

from byol_tf import config as config_lib
from byol_tf import networks
from byol_tf.config import NetworkConfig

# Non-default BatchNorm settings, so a layer left at Keras' defaults cannot pass.
BN_SETTINGS = dict(batchnorm_momentum=0.8, batchnorm_epsilon=2e-3, sync_batchnorm=True)

# (encoder, image size, d at width_multiplier 1)
ENCODERS = [("small_convnet", 28, 256), ("resnet18_cifar", 32, 512), ("resnet50", 32, 2048)]


def _config(encoder="small_convnet", **overrides):
    settings = dict(BN_SETTINGS)
    settings.update(overrides)
    return NetworkConfig(encoder=encoder, **settings)


@pytest.fixture(scope="module")
def encoders():
    """One encoder per kind, built once: ResNet-50 alone takes seconds to build."""
    return {name: networks.build_encoder(_config(name), size) for name, size, _ in ENCODERS}


def _batch_norms(model):
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def _convs(model):
    return {layer.name: layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)}


@pytest.mark.parametrize("name, size, dim", ENCODERS)
def test_encoder_output_shape_and_representation_dim(encoders, name, size, dim):
    model = encoders[name]
    images = np.random.default_rng(0).uniform(size=(2, size, size, 3)).astype("float32")
    with warnings.catch_warnings():
        # e.g. Keras warning that the input structure differs from the model's.
        warnings.simplefilter("error")
        representation = model(images, training=False)
    assert tuple(representation.shape) == (2, dim)
    assert networks.representation_dim(model) == dim
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(representation)))


def _resnet18_cifar_trainable_params(num_classes=0, width=1):
    """Hand count from the architecture: conv weights (no bias) + 2 BN parameters per channel."""

    def conv_bn(k, c_in, c_out):
        return k * k * c_in * c_out + 2 * c_out

    widths = [64 * width, 128 * width, 256 * width, 512 * width]
    total = conv_bn(3, 3, widths[0])
    c_in = widths[0]
    for stage, c_out in enumerate(widths):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            total += conv_bn(3, c_in, c_out) + conv_bn(3, c_out, c_out)
            if stride != 1 or c_in != c_out:
                total += conv_bn(1, c_in, c_out)
            c_in = c_out
    if num_classes:
        total += c_in * num_classes + num_classes
    return total


def test_resnet18_cifar_param_count_matches_hand_count(encoders):
    # Anchors the formula to the usual figure for CIFAR ResNet-18 with a 10-class head.
    assert _resnet18_cifar_trainable_params(num_classes=10) == 11_173_962
    model = encoders["resnet18_cifar"]
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    non_trainable = sum(int(np.prod(v.shape)) for v in model.non_trainable_weights)
    assert trainable == _resnet18_cifar_trainable_params() == 11_168_832
    # Moving mean and variance: as many as the BN gammas and betas.
    bn_params = sum(2 * layer.gamma.shape[0] for layer in _batch_norms(model))
    assert non_trainable == bn_params


def test_resnet18_cifar_stem_is_3x3_stride_1_without_pooling(encoders):
    model = encoders["resnet18_cifar"]
    stem = model.get_layer("stem_conv")
    assert stem.kernel_size == (3, 3) and stem.strides == (1, 1)
    assert not any(isinstance(layer, keras.layers.MaxPooling2D) for layer in model.layers)
    after_stem = model.get_layer("stem_relu").output
    assert tuple(after_stem.shape[1:3]) == (32, 32)
    assert tuple(model.get_layer("stage4_block2_out").output.shape[1:]) == (4, 4, 512)


def test_mlp_is_linear_bn_relu_linear_without_output_bn():
    config = _config()
    mlp = networks.build_mlp(16, 8, config, name="projector", input_dim=12)
    kinds = [type(layer) for layer in mlp.layers]
    assert kinds == [
        keras.layers.Dense,
        networks.FusedBatchNormalization,  # on [B, C] it takes Keras' own path
        keras.layers.ReLU,
        keras.layers.Dense,
    ]
    first, _, _, last = mlp.layers
    assert (first.units, last.units) == (16, 8)
    output = mlp(np.ones((3, 12), "float32"), training=True)
    assert tuple(output.shape) == (3, 8)


def test_mlp_output_layer_has_no_bias_and_hidden_layer_has_one():
    # As the reference: hk.Linear(with_bias=True) then hk.Linear(with_bias=False).
    mlp = networks.build_mlp(16, 8, _config(), name="projector", input_dim=12)
    hidden, output = mlp.get_layer("linear1"), mlp.get_layer("linear2")
    assert hidden.use_bias and not output.use_bias
    assert [v.path for v in hidden.weights] == ["projector/linear1/kernel", "projector/linear1/bias"]
    assert [v.path for v in output.weights] == ["projector/linear2/kernel"]


def test_mlp_builds_lazily_without_input_dim():
    mlp = networks.build_mlp(16, 8, _config(), name="predictor")
    assert tuple(mlp(np.ones((3, 5), "float32")).shape) == (3, 8)
    assert mlp.layers[0].kernel.shape == (5, 16)


@pytest.mark.parametrize("sync", [True, False])
def test_batchnorm_layers_follow_config(encoders, sync):
    config = _config("resnet18_cifar", sync_batchnorm=sync)
    models = [networks.build_encoder(config, 8), networks.build_mlp(4, 2, config, "mlp", input_dim=3)]
    if sync:
        models += [encoders["resnet50"], encoders["small_convnet"]]
    for model in models:
        layers = _batch_norms(model)
        assert layers, model.name
        for layer in layers:
            assert (layer.momentum, layer.epsilon, layer.synchronized) == (0.8, 2e-3, sync), layer.name
    if sync:
        # Stem, 3 per block x 16 blocks, 4 projection shortcuts.
        assert len(_batch_norms(encoders["resnet50"])) == 53


def test_batchnorm_momentum_is_the_decay_of_the_moving_average():
    # Keras momentum m: moving = m * moving + (1 - m) * batch; the reference's decay 0.9.
    config = _config(batchnorm_momentum=0.9, sync_batchnorm=False)
    mlp = networks.build_mlp(4, 2, config, "mlp", input_dim=3)
    inputs = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
    mlp(inputs, training=True)
    linear, bn = mlp.layers[0], mlp.layers[1]
    hidden = inputs @ keras.ops.convert_to_numpy(linear.kernel) + keras.ops.convert_to_numpy(linear.bias)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(bn.moving_mean), 0.1 * hidden.mean(axis=0), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("name, size, _dim", ENCODERS)
def test_normalization_maps_imagenet_mean_to_zero_and_one_std_to_one(encoders, name, size, _dim):
    model = encoders[name]
    normalized = keras.Model(model.inputs[0], model.get_layer(networks.NORMALIZATION_LAYER_NAME).output)
    mean = np.broadcast_to(np.array([0.485, 0.456, 0.406], "float32"), (1, size, size, 3))
    std = np.array([0.229, 0.224, 0.225], "float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(normalized(mean)), 0.0, atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(normalized(mean + std)), 1.0, atol=1e-5)
    # The normalisation comes first and has no weights to copy or to decay.
    assert model.layers[1].name == networks.NORMALIZATION_LAYER_NAME
    assert not model.get_layer(networks.NORMALIZATION_LAYER_NAME).weights


@pytest.mark.parametrize("name, conv_count", [("small_convnet", 4), ("resnet18_cifar", 20)])
def test_width_multiplier_doubles_every_width(name, conv_count):
    # Small images: the widths do not depend on the image size.
    narrow = networks.build_encoder(_config(name, width_multiplier=1), 8)
    wide = networks.build_encoder(_config(name, width_multiplier=2), 8)
    narrow_convs, wide_convs = _convs(narrow), _convs(wide)
    assert len(narrow_convs) == conv_count and narrow_convs.keys() == wide_convs.keys()
    for layer_name, layer in narrow_convs.items():
        assert wide_convs[layer_name].filters == 2 * layer.filters, layer_name
    assert networks.representation_dim(wide) == 2 * networks.representation_dim(narrow)


def _build(kind, config, name):
    if kind == "mlp":
        return networks.build_mlp(8, 4, config, name, input_dim=6)
    return networks.build_encoder(config, 8, name=name)


@pytest.mark.parametrize("kind", ["small_convnet", "resnet18_cifar", "resnet50", "mlp"])
def test_same_seed_gives_identical_weights_and_paths(kind):
    # Also guards against Keras' automatic layer names (conv2d_3, ...), which would
    # differ between BYOL's online and target copies.
    config = _config(kind if kind != "mlp" else "small_convnet")
    keras.utils.set_random_seed(7)
    first = _build(kind, config, "online")
    keras.utils.set_random_seed(7)
    second = _build(kind, config, "online")
    keras.utils.set_random_seed(8)
    other = _build(kind, config, "target")
    assert [v.path for v in first.weights] == [v.path for v in second.weights]
    for a, b in zip(first.weights, second.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    kernels = [np.asarray(keras.ops.convert_to_numpy(v)) for v in first.weights if v.path.endswith("kernel")]
    other_kernels = [np.asarray(keras.ops.convert_to_numpy(v)) for v in other.weights if v.path.endswith("kernel")]
    assert not np.array_equal(kernels[0], other_kernels[0])


def _check_paths(model):
    paths = [v.path for v in model.weights]
    assert len(paths) == len(set(paths)), "variable paths must be unique within a model"
    excluded = ("bias", "beta", "gamma")
    for variable in model.trainable_weights:
        name = variable.path.rsplit("/", 1)[-1]
        # LARS matches substrings of the whole path: only the real exclusions may match.
        matches = [word for word in excluded if word in variable.path]
        if name == "kernel":
            assert not matches, variable.path
        else:
            assert matches == [name], variable.path


@pytest.mark.parametrize("name", ["small_convnet", "resnet18_cifar", "resnet50"])
def test_variable_paths_are_unique_and_lars_substrings_only_match_biases_and_bn(encoders, name):
    _check_paths(encoders[name])


def test_mlp_variable_paths_are_unique_and_prefixed_by_its_name():
    mlp = networks.build_mlp(8, 4, _config(), "predictor", input_dim=6)
    _check_paths(mlp)
    assert all(v.path.startswith("predictor/") for v in mlp.weights)


def test_synchronized_batchnorm_trains_outside_a_strategy():
    model = networks.build_encoder(_config("small_convnet", sync_batchnorm=True), 8)
    images = np.random.default_rng(1).uniform(size=(4, 8, 8, 3)).astype("float32")
    import tensorflow as tf  # gradients only: the library itself is written against keras

    with tf.GradientTape() as tape:
        loss = keras.ops.sum(model(images, training=True) ** 2)
    gradients = tape.gradient(loss, model.trainable_weights)
    assert all(g is not None for g in gradients)


def test_unknown_encoder_raises_naming_the_field():
    with pytest.raises(ValueError, match=r"network\.encoder.*'vgg16'"):
        networks.build_encoder(NetworkConfig(encoder="vgg16"), 32)


@pytest.mark.parametrize("width", [0, 5, 8])
def test_bottleneck_resnets_reject_widths_other_than_1_to_4(width):
    match = rf"^network\.width_multiplier: {width} is not one of 1, 2, 3, 4 for encoder 'resnet101'"
    with pytest.raises(config_lib.ConfigError, match=match):
        networks.build_encoder(NetworkConfig(encoder="resnet101", width_multiplier=width), 32)


def test_zero_init_residual_is_rejected_for_encoders_without_bottlenecks():
    with pytest.raises(config_lib.ConfigError, match=r"^network\.zero_init_residual: only the bottleneck"):
        networks.build_encoder(NetworkConfig(encoder="resnet18_cifar", zero_init_residual=True), 32)


# ---- Bottleneck ResNets (resnet50 / 101 / 152 / 200) ----

# Published sizes in millions of parameters, classifier excluded: the paper's Table 1b
# (ResNet-50 2x 94M, 4x 375M, ResNet-200 2x 250M), torchvision's ResNet-50 (25,557,032 with
# its 1000-way fc of 2,049,000, i.e. 23.5M without it).
PUBLISHED_MILLIONS = {("resnet50", 1): 23.5, ("resnet50", 2): 94, ("resnet50", 4): 375, ("resnet200", 2): 250}


def _bottleneck_params(encoder: str, width: int, num_classes: int = 0) -> tuple[int, int]:
    """Hand count: (trainable, BN moving statistics) of a bottleneck ResNet.

    Trainable: conv kernels (no biases) + gamma and beta per BN channel (+ an fc head when
    `num_classes`); non-trainable: moving mean and variance, two per BN channel.
    """
    kernels = bn_channels = 0

    def conv_bn(kernel_size, c_in, c_out):
        nonlocal kernels, bn_channels
        kernels += kernel_size * kernel_size * c_in * c_out
        bn_channels += c_out

    conv_bn(7, 3, 64 * width)
    c_in = 64 * width
    for blocks, stage_width in zip(networks.BOTTLENECK_BLOCKS[encoder], (256, 512, 1024, 2048)):
        c_out = stage_width * width
        for block in range(blocks):
            if block == 0:
                conv_bn(1, c_in, c_out)
            conv_bn(1, c_in, c_out // 4)
            conv_bn(3, c_out // 4, c_out // 4)
            conv_bn(1, c_out // 4, c_out)
            c_in = c_out
    head = c_in * num_classes + num_classes if num_classes else 0
    return kernels + 2 * bn_channels + head, 2 * bn_channels


def _count(weights):
    return sum(int(np.prod(v.shape)) for v in weights)


def test_every_bottleneck_resnet_in_the_config_has_a_block_table():
    assert tuple(networks.BOTTLENECK_BLOCKS) == config_lib.BOTTLENECK_RESNETS
    for encoder, blocks in networks.BOTTLENECK_BLOCKS.items():
        # The depth in the name: stem conv + 3 convs per block + the classifier of the paper.
        assert 1 + 3 * sum(blocks) + 1 == int(encoder.removeprefix("resnet")), encoder


def test_bottleneck_hand_counts_match_the_published_sizes():
    # torchvision's resnet50 (v1.5, the same parameters as v1) with its 1000-way fc.
    assert _bottleneck_params("resnet50", 1, num_classes=1000)[0] == 25_557_032
    assert _bottleneck_params("resnet50", 1) == (23_508_032, 53_120)
    assert _bottleneck_params("resnet50", 2) == (93_907_072, 106_240)
    assert _bottleneck_params("resnet200", 2) == (250_128_512, 352_000)
    for (encoder, width), millions in PUBLISHED_MILLIONS.items():
        trainable, _ = _bottleneck_params(encoder, width)
        # To the published figure's precision (23.5 -> tenths, 94 -> units).
        digits = 0 if float(millions).is_integer() else 1
        assert round(trainable / 1e6, digits) == millions, (encoder, width)
    # The paper's 94M is without the classifier: with a 1000-way fc ResNet-50 2x has 98.0M.
    assert round(_bottleneck_params("resnet50", 2, num_classes=1000)[0] / 1e6) == 98


def _assert_params_match_hand_count(model, encoder, width):
    trainable, moving = _bottleneck_params(encoder, width)
    assert _count(model.trainable_weights) == trainable
    assert _count(model.non_trainable_weights) == moving
    assert model.count_params() == trainable + moving
    assert networks.representation_dim(model) == 2048 * width


def test_resnet50_params_match_hand_count(encoders):
    _assert_params_match_hand_count(encoders["resnet50"], "resnet50", 1)


@pytest.mark.slow
@pytest.mark.parametrize("encoder, width", [("resnet50", 2), ("resnet200", 2)])
def test_wide_and_deep_resnet_params_match_hand_count(encoder, width):
    # Built at 32 px and never called: the parameter count does not depend on the image
    # size, and a forward pass of ResNet-200 2x costs far more than building it.
    model = networks.build_encoder(_config(encoder, width_multiplier=width), 32)
    _assert_params_match_hand_count(model, encoder, width)
    assert tuple(model.output.shape) == (None, 2048 * width)


def test_resnet50_stem_and_stage_shapes(encoders):
    model = encoders["resnet50"]  # 32 px input
    stem = model.get_layer("stem_conv")
    assert stem.kernel_size == (7, 7) and stem.strides == (2, 2) and stem.filters == 64
    pool = model.get_layer("stem_pool")
    assert isinstance(pool, keras.layers.MaxPooling2D) and pool.pool_size == (3, 3) and pool.strides == (2, 2)
    assert tuple(model.get_layer("stem_relu").output.shape[1:]) == (16, 16, 64)
    assert tuple(pool.output.shape[1:]) == (8, 8, 64)
    last_blocks = {1: 3, 2: 4, 3: 6, 4: 3}
    expected = {1: (8, 256), 2: (4, 512), 3: (2, 1024), 4: (1, 2048)}
    for stage, (side, width) in expected.items():
        output = model.get_layer(f"stage{stage}_block{last_blocks[stage]}_out").output
        assert tuple(output.shape[1:]) == (side, side, width), stage


def test_resnet50_strides_sit_on_the_3x3_conv_v1_5(encoders):
    convs = _convs(encoders["resnet50"])
    for stage, blocks in enumerate(networks.BOTTLENECK_BLOCKS["resnet50"], start=1):
        for block in range(1, blocks + 1):
            prefix = f"stage{stage}_block{block}"
            stride = 2 if stage > 1 and block == 1 else 1
            first, middle, last = (convs[f"{prefix}_{index}_conv"] for index in (1, 2, 3))
            assert (first.kernel_size, middle.kernel_size, last.kernel_size) == ((1, 1), (3, 3), (1, 1))
            assert middle.strides == (stride, stride), prefix
            assert first.strides == last.strides == (1, 1), prefix
            # Bottleneck: the inner convs are a quarter of the stage width.
            assert first.filters == middle.filters == last.filters // 4, prefix
            shortcut = convs.get(f"{prefix}_shortcut_conv")
            if block == 1:
                assert shortcut.kernel_size == (1, 1) and shortcut.strides == (stride, stride), prefix
            else:
                assert shortcut is None, prefix


@pytest.mark.parametrize("name, _size, _dim", ENCODERS)
def test_no_conv_has_a_bias(encoders, name, _size, _dim):
    model = encoders[name]
    convs = _convs(model)
    assert convs and not any(layer.use_bias for layer in convs.values())
    assert not any(v.path.endswith("/bias") for v in model.weights)
    assert not any(isinstance(layer, keras.layers.Dense) for layer in model.layers)


def _gammas(model):
    return {layer.name: keras.ops.convert_to_numpy(layer.gamma) for layer in _batch_norms(model)}


def test_zero_init_residual_zeroes_exactly_the_last_bn_gamma_of_each_block(encoders):
    zeroed = networks.build_encoder(_config("resnet50", zero_init_residual=True), 8)
    last_bns = {f"stage{s}_block{b}_3_bn" for s, n in enumerate((3, 4, 6, 3), start=1) for b in range(1, n + 1)}
    gammas = _gammas(zeroed)
    assert len(last_bns) == 16 and last_bns <= gammas.keys()
    for name, gamma in gammas.items():
        np.testing.assert_array_equal(gamma, 0.0 if name in last_bns else 1.0, err_msg=name)
    # Off by default: every gamma starts at 1.
    assert NetworkConfig().zero_init_residual is False
    assert all(np.all(gamma == 1.0) for gamma in _gammas(encoders["resnet50"]).values())
    # A zeroed branch adds nothing: each block starts as ReLU(shortcut).
    images = np.random.default_rng(2).uniform(size=(2, 8, 8, 3)).astype("float32")
    block = keras.Model(
        zeroed.inputs[0],
        [zeroed.get_layer("stage1_block2_1_conv").input, zeroed.get_layer("stage1_block2_out").output],
    )
    block_input, block_output = (keras.ops.convert_to_numpy(t) for t in block(images, training=False))
    np.testing.assert_allclose(block_output, np.maximum(block_input, 0.0), atol=1e-6)


def test_bottleneck_conv_init_is_the_references_fan_in_truncated_normal(encoders):
    # haiku's Conv2D default: stddev 1/sqrt(fan_in), truncated at two standard deviations.
    layer = encoders["resnet50"].get_layer("stage3_block2_2_conv")  # 3x3, 256 -> 256
    kernel = keras.ops.convert_to_numpy(layer.kernel)
    stddev = (3 * 3 * 256) ** -0.5
    assert np.abs(kernel).max() <= 2 * stddev
    # A normal truncated at +-2 sigma keeps 0.88 of its standard deviation.
    np.testing.assert_allclose(kernel.std(), 0.8796 * stddev, rtol=0.02)


# ------------------------------------------------------------------ fused BatchNorm


def _bn_pair(shape, **settings):
    """A FusedBatchNormalization and a Keras BatchNormalization with equal, non-trivial weights."""
    layers = []
    for cls in (networks.FusedBatchNormalization, keras.layers.BatchNormalization):
        layer = cls(momentum=0.8, epsilon=2e-3, **settings)
        layer.build(shape)
        channels = shape[-1]
        layer.gamma.assign(np.linspace(0.5, 2.0, channels))
        layer.beta.assign(np.linspace(-1.0, 1.0, channels))
        layer.moving_mean.assign(np.linspace(-0.3, 0.3, channels))
        layer.moving_variance.assign(np.linspace(0.5, 1.5, channels))
        layers.append(layer)
    return layers


def _forward_and_gradients(layer, x, training):
    import tensorflow as tf

    inputs = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        outputs = layer(inputs, training=training)
        loss = tf.reduce_sum(outputs * tf.sin(outputs))  # any loss whose gradient varies per element
    gradients = tape.gradient(loss, [inputs, layer.gamma, layer.beta])
    return outputs.numpy(), [g.numpy() for g in gradients]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(6, 5, 5, 4), (2, 1, 1, 3), (8, 16)])
def test_fused_batchnorm_computes_what_keras_batchnorm_computes(training, shape):
    # Outputs, gradients of input / gamma / beta and the moving statistics after the call all
    # equal Keras' own layer: on feature maps through the fused kernel (its unbiased running
    # variance rescaled to Keras' biased one), on [B, C] through Keras' path.
    x = np.random.default_rng(0).normal(2.0, 3.0, shape).astype("float32")
    fused, reference = _bn_pair(shape)
    out_f, grads_f = _forward_and_gradients(fused, x, training)
    out_r, grads_r = _forward_and_gradients(reference, x, training)
    np.testing.assert_allclose(out_f, out_r, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads_f, grads_r):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    np.testing.assert_allclose(fused.moving_mean.numpy(), reference.moving_mean.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fused.moving_variance.numpy(), reference.moving_variance.numpy(), rtol=1e-5)
    if training:  # the statistics moved by (1 - momentum) towards the batch's biased moments
        axes = tuple(range(len(shape) - 1))
        expected = 0.8 * np.linspace(0.5, 1.5, shape[-1]) + 0.2 * x.var(axis=axes)
        np.testing.assert_allclose(fused.moving_variance.numpy(), expected, rtol=1e-5)


def test_every_encoder_batchnorm_is_fused(encoders):
    for encoder in encoders.values():
        norms = _batch_norms(encoder)
        assert norms and all(isinstance(layer, networks.FusedBatchNormalization) for layer in norms)


def test_portable_copy_has_keras_layers_only_and_the_same_outputs(tmp_path, encoders):
    import zipfile

    from byol_tf import training

    encoder = encoders["small_convnet"]
    path = str(tmp_path / "encoder.keras")
    training.save_keras_atomically(encoder, path)
    with zipfile.ZipFile(path) as archive:
        saved_config = archive.read("config.json").decode()
    assert "byol_tf" not in saved_config and "FusedBatchNormalization" not in saved_config
    loaded = keras.models.load_model(path, compile=False)
    assert all(type(layer) is keras.layers.BatchNormalization for layer in _batch_norms(loaded))
    images = np.random.default_rng(1).uniform(0, 1, (4, 28, 28, 3)).astype("float32")
    np.testing.assert_allclose(loaded(images, training=False), encoder(images, training=False), rtol=1e-5, atol=1e-5)
