"""Tests for byol_tf.augment: per-image randomness, op rates, op maths, determinism."""

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf

from byol_tf import augment
from byol_tf.config import AugmentConfig, ViewConfig

CONFIG = AugmentConfig(image_size=32)
SEED = tf.constant([3, 7], tf.int64)
# A view with every post-crop op off: tests switch one on at a time.
PLAIN = ViewConfig(flip_prob=0.0, color_jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0, solarize_prob=0.0)


def _images(batch=4, size=32, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (batch, size, size, channels), dtype=np.uint8)


def _params(batch, **overrides):
    """View params with every op off, then `overrides` (numpy values)."""
    params = {
        "flip": np.zeros(batch, bool),
        "jitter": np.zeros(batch, bool),
        "brightness": np.zeros(batch, np.float32),
        "contrast": np.ones(batch, np.float32),
        "saturation": np.ones(batch, np.float32),
        "hue": np.zeros(batch, np.float32),
        "jitter_order": np.tile(np.arange(4, dtype=np.int32), (batch, 1)),
        "grayscale": np.zeros(batch, bool),
        "blur": np.zeros(batch, bool),
        "blur_sigma": np.ones(batch, np.float32),
        "solarize": np.zeros(batch, bool),
    }
    params.update(overrides)
    return {key: tf.constant(value) for key, value in params.items()}


def test_identical_images_give_different_views():
    images = np.repeat(_images(batch=1), 8, axis=0)
    view1, view2 = augment.two_views(images, CONFIG, SEED)
    for view in (view1.numpy(), view2.numpy()):
        flat = view.reshape(8, -1)
        distances = np.abs(flat[:, None] - flat[None]).mean(axis=-1)
        off_diagonal = distances[~np.eye(8, dtype=bool)]
        assert off_diagonal.min() > 1e-3
    assert np.abs(view1.numpy() - view2.numpy()).mean() > 1e-3


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_views_shape_dtype_and_range(dtype):
    images = _images(batch=6, size=40)
    if dtype == np.float32:
        images = images.astype(np.float32) / 255.0
    view1, view2 = augment.two_views(images, CONFIG, SEED)
    for view in (view1, view2):
        assert view.shape == (6, 32, 32, 3)
        assert view.dtype == tf.float32
        assert float(tf.reduce_min(view)) >= 0.0
        assert float(tf.reduce_max(view)) <= 1.0


def test_grayscale_input_gives_three_channels():
    images = _images(batch=3, size=28, channels=1)
    view1, view2 = augment.two_views(images, CONFIG, SEED)
    assert view1.shape == view2.shape == (3, 32, 32, 3)
    evaluated = augment.center_crop_resize(images, 32)
    assert evaluated.shape == (3, 32, 32, 3)
    np.testing.assert_allclose(evaluated[..., 0], evaluated[..., 2])


@pytest.mark.parametrize(
    "view_name, flag, expected",
    [
        ("view1", "flip", 0.5),
        ("view1", "jitter", 0.8),
        ("view1", "grayscale", 0.2),
        ("view1", "blur", 1.0),
        ("view1", "solarize", 0.0),
        ("view2", "flip", 0.5),
        ("view2", "jitter", 0.8),
        ("view2", "grayscale", 0.2),
        ("view2", "blur", 0.1),
        ("view2", "solarize", 0.2),
    ],
)
def test_op_rates_match_config(view_name, flag, expected):
    view = getattr(CONFIG, view_name)
    params = augment.sample_view_params(4000, view, SEED)
    rate = float(tf.reduce_mean(tf.cast(params[flag], tf.float32)))
    assert abs(rate - expected) <= 0.03


def test_magnitudes_within_config_ranges():
    view = CONFIG.view1
    params = {k: v.numpy() for k, v in augment.sample_view_params(4000, view, SEED).items()}
    eps = 1e-6  # float32 rounding of the range ends
    assert np.abs(params["brightness"]).max() <= view.brightness + eps
    assert np.abs(params["contrast"] - 1).max() <= view.contrast + eps
    assert np.abs(params["saturation"] - 1).max() <= view.saturation + eps
    assert np.abs(params["hue"]).max() <= view.hue + eps
    assert params["blur_sigma"].min() >= view.blur_sigma[0] - eps
    assert params["blur_sigma"].max() <= view.blur_sigma[1] + eps
    # The draws fill their ranges (a constant would pass the bounds above).
    assert np.abs(params["saturation"] - 1).max() > 0.9 * view.saturation
    # Every image gets a permutation of the four jitter ops, and all 24 orders occur.
    np.testing.assert_array_equal(np.sort(params["jitter_order"], axis=1), np.tile(np.arange(4), (4000, 1)))
    assert len({tuple(row) for row in params["jitter_order"]}) == 24


def test_flip_grayscale_solarize_match_numpy():
    images = _images(batch=3, seed=1)
    floats = images.astype(np.float32) / 255.0
    on = np.array([True, False, True])
    view = dataclasses.replace(PLAIN, flip_prob=0.5, grayscale_prob=0.5, solarize_prob=0.5)

    flipped = augment.apply_view_params(images, _params(3, flip=on), view).numpy()
    expected = np.where(on[:, None, None, None], floats[:, :, ::-1], floats)
    np.testing.assert_allclose(flipped, expected, atol=1e-6)

    gray = augment.apply_view_params(images, _params(3, grayscale=on), view).numpy()
    luma = floats @ np.array([0.2989, 0.5870, 0.1140], np.float32)
    expected = np.where(on[:, None, None, None], np.repeat(luma[..., None], 3, axis=-1), floats)
    np.testing.assert_allclose(gray, expected, atol=1e-5)

    solarized = augment.apply_view_params(images, _params(3, solarize=on), view).numpy()
    expected = np.where(on[:, None, None, None] & (floats >= 0.5), 1.0 - floats, floats)
    np.testing.assert_allclose(solarized, expected, atol=1e-6)


def test_saturation_matches_tf_image():
    images = tf.constant(_images(batch=5, seed=2).astype(np.float32) / 255.0)
    factors = tf.constant([0.0, 0.5, 1.0, 1.5, 2.0])
    got = augment._adjust_saturation(images, factors)
    for index in range(5):
        expected = tf.image.adjust_saturation(images[index], factors[index])
        np.testing.assert_allclose(got[index], expected, atol=1e-5)


def test_color_jitter_applies_each_images_own_order():
    batch = 24
    view = dataclasses.replace(PLAIN, color_jitter_prob=0.8)
    params = augment.sample_view_params(batch, view, tf.constant([5, 5], tf.int64))
    # Strong enough magnitudes that a wrong order shows.
    params["brightness"] = tf.linspace(-0.4, 0.4, batch)
    params["contrast"] = tf.linspace(0.6, 1.4, batch)
    params["saturation"] = tf.linspace(0.0, 2.0, batch)
    params["hue"] = tf.linspace(-0.3, 0.3, batch)
    images = tf.constant(_images(batch=batch, size=16, seed=3).astype(np.float32) / 255.0)
    view = dataclasses.replace(view, brightness=0.4, contrast=0.4, saturation=1.0, hue=0.3)
    got = augment.apply_view_params(images, params, view).numpy()

    reference_ops = [
        lambda x, v: tf.image.adjust_brightness(x, v),
        lambda x, v: tf.image.adjust_contrast(x, v),
        lambda x, v: tf.image.adjust_saturation(x, v),
        lambda x, v: tf.image.adjust_hue(x, v),
    ]
    names = ["brightness", "contrast", "saturation", "hue"]
    jittered = params["jitter"].numpy()
    assert 0 < jittered.sum() < batch
    for index in range(batch):
        expected = images[index]
        if jittered[index]:
            for op in params["jitter_order"][index].numpy():
                expected = tf.clip_by_value(reference_ops[op](expected, params[names[op]][index]), 0.0, 1.0)
        np.testing.assert_allclose(got[index], expected, atol=2e-5)


def test_blur_of_a_delta_sums_to_one_and_is_symmetric():
    size = 64  # kernel 2 * int(64 / 20) + 1 = 7 taps
    delta = np.zeros((2, size, size, 3), np.float32)
    delta[:, size // 2, size // 2, :] = 1.0
    view = dataclasses.replace(PLAIN, blur_prob=1.0)
    sigmas = np.array([0.5, 2.0], np.float32)
    out = augment.apply_view_params(delta, _params(2, blur=np.array([True, True]), blur_sigma=sigmas), view).numpy()
    for index, sigma in enumerate(sigmas):
        image = out[index, ..., 0]
        np.testing.assert_allclose(image.sum(), 1.0, rtol=1e-5)
        patch = image[size // 2 - 3 : size // 2 + 4, size // 2 - 3 : size // 2 + 4]
        np.testing.assert_allclose(patch, patch[::-1], atol=1e-7)
        np.testing.assert_allclose(patch, patch[:, ::-1], atol=1e-7)
        np.testing.assert_allclose(patch, patch.T, atol=1e-7)
        taps = np.exp(-np.arange(-3, 4) ** 2 / (2 * sigma**2))
        taps /= taps.sum()
        np.testing.assert_allclose(patch, np.outer(taps, taps), atol=1e-6)
    # The wider sigma spreads more mass away from the centre.
    assert out[1, size // 2, size // 2, 0] < out[0, size // 2, size // 2, 0]


def _numpy_blur(image, sigma, radius):
    """Separable Gaussian blur of one [H, W, C] image, reflect padding, in float64."""
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2.0 * sigma**2))
    taps /= taps.sum()
    out = image.astype(np.float64)
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="reflect")
        length = out.shape[axis]
        out = sum(taps[t] * np.take(padded, np.arange(t, t + length), axis=axis) for t in range(len(taps)))
    return out


@pytest.mark.parametrize("height, width, radius", [(32, 32, 1), (40, 52, 5), (224, 224, 11)])
def test_gaussian_blur_matches_a_numpy_reference_per_image(height, width, radius):
    rng = np.random.default_rng(radius)
    images = rng.uniform(size=(3, height, width, 3)).astype(np.float32)
    sigmas = np.array([0.1, 1.0, 2.0], np.float32)
    got = augment.gaussian_blur(tf.constant(images), tf.constant(sigmas), radius).numpy()
    for index, sigma in enumerate(sigmas):
        np.testing.assert_allclose(got[index], _numpy_blur(images[index], sigma, radius), atol=1e-5)
    # The same inside a tf.data map (graph mode, unknown batch size), and an empty batch.
    dataset = tf.data.Dataset.from_tensors((images, sigmas)).map(lambda x, s: augment.gaussian_blur(x, s, radius))
    np.testing.assert_allclose(next(iter(dataset)).numpy(), got, atol=1e-6)
    empty = augment.gaussian_blur(tf.zeros([0, height, width, 3]), tf.zeros([0]), radius)
    assert empty.shape == (0, height, width, 3)


def test_blur_kernel_size_follows_image_size():
    assert augment._blur_radius(32) == 1
    assert augment._blur_radius(224) == 11
    assert augment._blur_radius(16) == 0


def test_blur_only_where_flagged():
    images = _images(batch=4, seed=4)
    view = dataclasses.replace(PLAIN, blur_prob=0.5)
    flags = np.array([True, False, False, True])
    out = augment.apply_view_params(images, _params(4, blur=flags, blur_sigma=np.full(4, 2.0, np.float32)), view)
    floats = images.astype(np.float32) / 255.0
    changed = np.abs(out.numpy() - floats).reshape(4, -1).max(axis=1) > 1e-3
    np.testing.assert_array_equal(changed, flags)
    # No image flagged (common for view 2's p=0.1 on small batches) is the identity.
    none = augment.apply_view_params(images, _params(4, blur=np.zeros(4, bool)), view)
    np.testing.assert_allclose(none, floats, atol=1e-7)


@pytest.mark.parametrize("height, width", [(32, 32), (20, 60)])
def test_crop_boxes_within_scale_and_ratio(height, width):
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    boxes = augment.sample_crop_boxes(3000, height, width, scale, ratio, SEED).numpy()
    box_h = boxes[:, 2] - boxes[:, 0]
    box_w = boxes[:, 3] - boxes[:, 1]
    assert boxes.min() >= 0.0 and boxes.max() <= 1.0 + 1e-6
    area = box_h * box_w
    aspect = box_w * width / (box_h * height)
    assert area.min() >= scale[0] - 1e-6
    assert area.max() <= scale[1] + 1e-6
    assert aspect.min() >= ratio[0] - 1e-4
    assert aspect.max() <= ratio[1] + 1e-4
    # The sizes spread over the range rather than collapsing to one value.
    assert area.std() > 0.05


def test_whole_image_crop_at_input_size_is_identity():
    images = _images(batch=2, size=32, seed=5)
    crops = augment.random_resized_crop(images, 32, (1.0, 1.0), (1.0, 1.0), SEED)
    np.testing.assert_allclose(crops, images.astype(np.float32) / 255.0, atol=1e-6)


def test_random_resized_crop_shape_and_per_image_boxes():
    images = np.repeat(_images(batch=1, size=48), 5, axis=0)
    crops = augment.random_resized_crop(images, 24, (0.08, 1.0), (3 / 4, 4 / 3), SEED).numpy()
    assert crops.shape == (5, 24, 24, 3)
    assert np.abs(crops[0] - crops[1:]).reshape(4, -1).mean(axis=1).min() > 1e-3


def test_center_crop_resize():
    images = _images(batch=2, size=32, seed=6)
    same = augment.center_crop_resize(images, 32)
    np.testing.assert_allclose(same, images.astype(np.float32) / 255.0, atol=1e-6)
    # A larger input is cropped to 0.875 of its side: 64 -> centred 56 -> 28 is a 2x2 mean.
    large = np.zeros((1, 64, 64, 3), np.uint8)
    large[:, 4:60, 4:60] = 255
    out = augment.center_crop_resize(large, 28).numpy()
    np.testing.assert_allclose(out, 1.0, atol=1e-6)
    single = augment.center_crop_resize(images[0], 16)
    assert single.shape == (16, 16, 3)
    np.testing.assert_array_equal(single, augment.center_crop_resize(images[0], 16))


def test_determinism_same_and_different_seed():
    images = _images(batch=4, seed=7)
    first = augment.two_views(images, CONFIG, SEED)
    again = augment.two_views(images, CONFIG, SEED)
    other = augment.two_views(images, CONFIG, tf.constant([3, 8], tf.int64))
    for a, b, c in zip(first, again, other):
        np.testing.assert_array_equal(a, b)
        assert np.abs(a.numpy() - c.numpy()).mean() > 1e-3


def test_same_output_in_tf_function_and_dataset_map():
    images = _images(batch=4, size=36, seed=8)
    eager = augment.two_views(images, CONFIG, SEED)
    traced = tf.function(lambda x, s: augment.two_views(x, CONFIG, s))(images, SEED)
    dataset = tf.data.Dataset.from_tensors(images).map(
        lambda x: augment.two_views(x, CONFIG, SEED), num_parallel_calls=2
    )
    (mapped,) = list(dataset)
    # Graph rewrites may reorder float sums: equal up to rounding, not bit for bit.
    for a, b, c in zip(eager, traced, mapped):
        np.testing.assert_allclose(a, b, atol=1e-5)
        np.testing.assert_allclose(a, c, atol=1e-5)


def test_view_transform_equals_apply_of_sample():
    images = _images(batch=4, seed=9)
    direct = augment.view_transform(images, CONFIG.view2, SEED)
    params = augment.sample_view_params(4, CONFIG.view2, SEED)
    np.testing.assert_array_equal(direct, augment.apply_view_params(images, params, CONFIG.view2))


def test_gaussian_kernels_normalised():
    kernels = augment.gaussian_kernels(tf.constant([0.1, 1.0, 2.0]), 2).numpy()
    np.testing.assert_allclose(kernels.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(kernels, kernels[:, ::-1])
    expected = np.exp(-np.arange(-2, 3) ** 2 / 2.0)
    np.testing.assert_allclose(kernels[1], expected / expected.sum(), rtol=1e-6)
    assert math.isclose(kernels[0, 2], 1.0, rel_tol=1e-6)


# ------------------------------------------------------------ decode only the crop


def _natural_image(rng, height, width):
    """Smooth colour fields plus noise: JPEG-like content (flat images hide window errors)."""
    coarse = rng.uniform(size=(1, height // 16 + 2, width // 16 + 2, 3))
    image = tf.image.resize(coarse, (height, width), method="bicubic")[0].numpy()
    image = image + rng.normal(scale=0.05, size=image.shape)
    return (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)


@pytest.mark.parametrize("chroma_downsampling", [True, False])
def test_jpeg_window_crops_equal_crops_of_the_decoded_image(chroma_downsampling):
    rng = np.random.default_rng(3)
    config = AugmentConfig(image_size=40, view1=ViewConfig(crop_scale=(0.02, 1.0)), view2=ViewConfig(crop_ratio=(0.2, 5.0)))
    worst = 0.0
    for index in range(24):
        height, width = (int(side) for side in rng.integers(20, 300, 2))
        encoded = tf.io.encode_jpeg(
            _natural_image(rng, height, width), quality=90, chroma_downsampling=chroma_downsampling
        )
        seed = tf.constant([index, 11], tf.int64)
        windowed = augment.jpeg_crop_views(encoded, config, seed)
        decoded = tf.io.decode_image(encoded, channels=3)
        whole = augment.crop_views(decoded[None], config, seed)
        for crop, expected in zip(windowed, whole):
            assert crop.shape == (40, 40, 3) and crop.dtype == tf.float32
            worst = max(worst, float(tf.reduce_max(tf.abs(crop - expected[0]))))
    # The same boxes and sample positions up to float rounding: far below one uint8 level.
    assert worst < 1e-4


def test_crop_window_holds_every_sampled_pixel_and_stays_inside_the_image():
    boxes = augment.sample_crop_boxes(200, 37, 53, (0.01, 1.0), (0.2, 5.0), tf.constant([1, 2], tf.int64))
    for box in boxes:
        window, window_box = (value.numpy() for value in augment.crop_window(box, 37, 53, 9))
        top, left, rows, columns = window
        assert top >= 0 and left >= 0 and top + rows <= 37 and left + columns <= 53 and rows >= 1 and columns >= 1
        assert np.all((window_box >= 0) & (window_box <= 1))
        # The window's first and last sample rows / columns, in image pixels.
        first_y = top + window_box[0] * max(rows - 1, 1)
        last_y = top + window_box[2] * max(rows - 1, 1)
        centres_y = (box[0].numpy() * 37 + 0.5 * (box[2] - box[0]).numpy() * 37 / 9 - 0.5)
        np.testing.assert_allclose(first_y, np.clip(centres_y, 0, 36), atol=1e-3)
        assert last_y <= top + rows - 1 + 1e-4


# ------------------------------------------------------- augmentation on the device


def test_device_views_equal_the_host_transforms_with_the_same_seeds():
    rng = np.random.default_rng(4)
    config = AugmentConfig(image_size=48)  # blur radius 2, all ops on
    crops = [tf.constant(rng.integers(0, 256, (24, 48, 48, 3), dtype=np.uint8)) for _ in range(2)]
    compiled = tf.function(lambda batch: augment.device_views(batch, config), jit_compile=True)
    for seed in ([0, 1], [5, 9]):
        seed = tf.constant(seed, tf.int64)
        host = augment.transform_views(*crops, config, seed)
        batch = augment.host_views(*crops, config, seed)
        assert batch["crop1"].dtype == tf.uint8 and batch["params1"].shape == (24, augment.PACKED_PARAMS)
        for device in (augment.device_views(batch, config), compiled(batch)):  # eager, and under XLA
            for got, expected in zip(device, host):
                np.testing.assert_allclose(got, expected, atol=1e-5)


def test_static_shape_ops_equal_the_partitioned_ops():
    images = _images(batch=16, size=40)
    for view in (ViewConfig(), ViewConfig(blur_prob=0.1, solarize_prob=0.2)):
        params = augment.sample_view_params(16, view, tf.constant([2, 3], tf.int64))
        partitioned = augment.apply_view_params(images, params, view)
        static = augment.apply_view_params(images, params, view, static_shapes=True)
        np.testing.assert_allclose(static, partitioned, atol=1e-6)


def test_packed_parameters_round_trip():
    params = augment.sample_view_params(32, ViewConfig(), tf.constant([4, 4], tf.int64))
    unpacked = augment.unpack_view_params(augment.pack_view_params(params))
    assert set(unpacked) == set(params) - {"flip"}
    for name, value in unpacked.items():
        assert value.dtype == params[name].dtype, name
        np.testing.assert_array_equal(value, params[name], err_msg=name)


def test_placement_auto_is_host_without_accelerators_and_unknown_names_fail():
    assert augment.resolve_placement("auto") == "host"  # the test machines have no GPU / TPU
    assert augment.resolve_placement("device") == "device"
    with pytest.raises(ValueError, match="augment.placement: 'gpu' is not one of"):
        augment.resolve_placement("gpu")
