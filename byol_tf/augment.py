"""BYOL's two view distributions (Grill et al. 2020, Table 6) with per-image randomness.

A view is: random resized crop -> horizontal flip -> colour jitter (brightness, contrast,
saturation, hue in a random order per image) -> grayscale -> Gaussian blur -> solarise ->
clip to [0, 1]. The order and the op definitions follow the reference implementation
(google-deepmind/deepmind-research, byol/utils/augmentations.py): additive brightness,
per-channel-mean contrast, HSV saturation and hue, each jitter op clipped, luma
grayscale, kernel size = image size / 10. Deviations, each explained where it is made:
bilinear rather than bicubic crop resizing, reflect rather than zero padding in the blur,
and torchvision-style crop sampling (10 tries, then a centre crop) with sub-pixel boxes.

Every random draw is a stateless op (`tf.random.stateless_*`) keyed by a seed tensor of
shape [2] that the caller passes, so a view depends only on (image, seed): the same in
eager mode, under `tf.function` and inside `tf.data.Dataset.map`. Parameters are drawn per
image and applied to the whole batch with vectorised ops (no per-image `tf.map_fn`).
"""

from __future__ import annotations

import math
from typing import Sequence

import tensorflow as tf

from byol_tf.config import AUGMENT_PLACEMENTS, AugmentConfig, ViewConfig

# ITU-R 601-2 luma, as in the reference and tf.image.rgb_to_grayscale.
_GRAYSCALE_WEIGHTS = (0.2989, 0.5870, 0.1140)
# Rejection-sampling tries before the crop falls back to a centre crop (as torchvision).
_CROP_ATTEMPTS = 10
# Kernel size = image size / _BLUR_DIVIDER (reference: blur_divider=10).
_BLUR_DIVIDER = 10.0
# Colour-jitter ops, indexed by the per-image order in params["jitter_order"].
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)
_NUM_JITTER_OPS = 4


# The ops below hold no data-dependent Python control flow: skipping AutoGraph's source
# conversion cuts tracing (in tf.function and tf.data.Dataset.map) from seconds to
# well under one.
_no_autograph = tf.autograph.experimental.do_not_convert


@_no_autograph
def to_float_rgb(images: tf.Tensor) -> tf.Tensor:
    """Converts images to float32 in [0, 1] with 3 channels.

    Args:
        images: [..., H, W, C] with C in {1, 3, 4}; integer images are scaled by their
            dtype's maximum (uint8 by 255), float images are assumed to be in [0, 1].

    Returns:
        float32 [..., H, W, 3]; a single channel is repeated, an alpha channel dropped.
    """
    images = tf.image.convert_image_dtype(tf.convert_to_tensor(images), tf.float32)
    return _ensure_rgb(images)


def _ensure_rgb(images: tf.Tensor) -> tf.Tensor:
    channels = images.shape[-1]
    if channels == 3:
        return images
    if channels == 1:
        return tf.repeat(images, 3, axis=-1)
    if channels is not None:
        return images[..., :3]
    # Channels unknown at trace time (e.g. decoded without `channels=`): decide at run time.
    images = tf.cond(
        tf.equal(tf.shape(images)[-1], 1),
        lambda: tf.repeat(images, 3, axis=-1),
        lambda: images[..., :3],
    )
    return tf.ensure_shape(images, images.shape[:-1].concatenate([3]))


def _split(seed: tf.Tensor, num: int) -> tf.Tensor:
    return tf.random.experimental.stateless_split(tf.convert_to_tensor(seed), num)


# --------------------------------------------------------------------------- crops


@_no_autograph
def sample_crop_boxes(
    batch_size,
    height,
    width,
    scale: Sequence[float],
    ratio: Sequence[float],
    seed: tf.Tensor,
) -> tf.Tensor:
    """Samples one random-resized-crop box per image.

    Area fraction ~ U(scale), aspect ratio (width / height in pixels) log-uniform in
    `ratio`; up to 10 tries per image, then a centre crop of the whole image with its
    aspect clamped to `ratio` (as torchvision and the SimCLR reference). Boxes are
    continuous (sub-pixel) rather than rounded to whole pixels: bilinear sampling makes
    rounding unnecessary.

    Args:
        batch_size: number of boxes (int or scalar tensor).
        height: image height in pixels (int or scalar tensor).
        width: image width in pixels.
        scale: (min, max) fraction of the image area.
        ratio: (min, max) aspect ratio.
        seed: int tensor of shape [2].

    Returns:
        float32 [B, 4] boxes (y_min, x_min, y_max, x_max) as fractions of height / width.
    """
    height = tf.cast(height, tf.float32)
    width = tf.cast(width, tf.float32)
    area_seed, ratio_seed, offset_seed = tf.unstack(_split(seed, 3))
    shape = tf.stack([batch_size, _CROP_ATTEMPTS])
    area = height * width * tf.random.stateless_uniform(
        shape, area_seed, minval=scale[0], maxval=scale[1]
    )
    aspect = tf.exp(
        tf.random.stateless_uniform(
            shape, ratio_seed, minval=math.log(ratio[0]), maxval=math.log(ratio[1])
        )
    )
    crop_w = tf.sqrt(area * aspect)
    crop_h = tf.sqrt(area / aspect)
    fits = (crop_w <= width) & (crop_h <= height)
    first_fit = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    any_fit = tf.reduce_any(fits, axis=1)
    crop_w = tf.gather(crop_w, first_fit, axis=1, batch_dims=1)
    crop_h = tf.gather(crop_h, first_fit, axis=1, batch_dims=1)

    # Fallback: the largest centred box whose aspect lies in `ratio`.
    image_aspect = width / height
    fallback_w = tf.where(image_aspect > ratio[1], height * ratio[1], width)
    fallback_h = tf.where(image_aspect < ratio[0], width / ratio[0], height)
    crop_w = tf.where(any_fit, crop_w, fallback_w)
    crop_h = tf.where(any_fit, crop_h, fallback_h)

    offsets = tf.random.stateless_uniform(tf.stack([batch_size, 2]), offset_seed)
    offsets = tf.where(any_fit[:, None], offsets, 0.5)
    top = offsets[:, 0] * (height - crop_h)
    left = offsets[:, 1] * (width - crop_w)
    return tf.stack(
        [top / height, left / width, (top + crop_h) / height, (left + crop_w) / width], axis=1
    )


@_no_autograph
def crop_and_resize_boxes(images: tf.Tensor, boxes: tf.Tensor, size: int) -> tf.Tensor:
    """Crops box b of image b and resizes it to size x size (bilinear).

    Args:
        images: [B, H, W, C], any dtype `tf.image.crop_and_resize` takes (uint8 or float).
        boxes: [B, 4] (y_min, x_min, y_max, x_max) as fractions of the image's extent.
        size: output height and width.

    Returns:
        float32 [B, size, size, C] in [0, 1].
    """
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    height = tf.cast(shape[1], tf.float32)
    width = tf.cast(shape[2], tf.float32)
    # crop_and_resize samples at pixel centres from y_min * (H - 1) to y_max * (H - 1);
    # map the box's edges so output pixel centres land where tf.image.resize (half-pixel
    # centres) would put them: a whole-image box at the input size is then the identity.
    # Clamping to the image keeps small up-sampled crops at the border from reading the
    # zero extrapolation value (shifts their border samples by under half a source pixel).
    y_scale = tf.maximum(height - 1.0, 1.0)
    x_scale = tf.maximum(width - 1.0, 1.0)
    top, left, bottom, right = _sample_centres(boxes, height, width, size)
    sample_boxes = tf.clip_by_value(
        tf.stack([top / y_scale, left / x_scale, bottom / y_scale, right / x_scale], axis=1), 0.0, 1.0
    )
    # Deviation from the paper: bilinear instead of bicubic resampling, because
    # crop_and_resize (one fused op for per-image boxes) offers only bilinear / nearest.
    crops = tf.image.crop_and_resize(
        images, sample_boxes, tf.range(shape[0]), [size, size], method="bilinear"
    )
    if images.dtype.is_integer:
        crops = crops / float(images.dtype.max)
    return tf.clip_by_value(crops, 0.0, 1.0)


def _sample_centres(boxes: tf.Tensor, height: tf.Tensor, width: tf.Tensor, size: int):
    """Pixel positions (first row, first column, last row, last column) of the output pixel
    centres of box b, before clamping to the image: see `crop_and_resize_boxes`."""
    top, left, bottom, right = tf.unstack(boxes, axis=1)
    half_y = 0.5 * (bottom - top) * height / size
    half_x = 0.5 * (right - left) * width / size
    return (
        top * height + half_y - 0.5,
        left * width + half_x - 0.5,
        bottom * height - half_y - 0.5,
        right * width - half_x - 0.5,
    )


# Extra pixels decoded around the samples a crop reads: a JPEG window's outermost columns
# can differ from the whole image's (chroma upsampling sees no neighbour there), and float
# rounding of window-relative positions may step just past a sampled pixel.
_WINDOW_MARGIN = 2


@_no_autograph
def crop_window(box: tf.Tensor, height, width, size: int) -> tuple[tf.Tensor, tf.Tensor]:
    """The pixel window that `crop_and_resize_boxes(image, box[None], size)` reads, and the box
    that crops the same samples from that window alone.

    Args:
        box: float32 [4] (y_min, x_min, y_max, x_max) as fractions of the image's extent.
        height: image height in pixels (scalar).
        width: image width in pixels.
        size: output height and width.

    Returns:
        (window int32 [4]: (top row, left column, rows, columns) inside the image, as
        `tf.image.decode_and_crop_jpeg` takes it; box float32 [4] relative to that window).
    """
    height = tf.cast(height, tf.float32)
    width = tf.cast(width, tf.float32)
    top, left, bottom, right = (
        tf.clip_by_value(position, 0.0, limit - 1.0)
        for position, limit in zip(_sample_centres(box[None], height, width, size), (height, width) * 2)
    )
    margin = float(_WINDOW_MARGIN)
    y0 = tf.maximum(tf.floor(top[0]) - margin, 0.0)
    x0 = tf.maximum(tf.floor(left[0]) - margin, 0.0)
    y1 = tf.minimum(tf.math.ceil(bottom[0]) + margin, height - 1.0)
    x1 = tf.minimum(tf.math.ceil(right[0]) + margin, width - 1.0)
    rows, columns = y1 - y0 + 1.0, x1 - x0 + 1.0
    y_scale = tf.maximum(rows - 1.0, 1.0)
    x_scale = tf.maximum(columns - 1.0, 1.0)
    window_box = tf.clip_by_value(
        tf.stack([(top[0] - y0) / y_scale, (left[0] - x0) / x_scale, (bottom[0] - y0) / y_scale, (right[0] - x0) / x_scale]),
        0.0,
        1.0,
    )
    window = tf.cast(tf.stack([y0, x0, rows, columns]), tf.int32)
    return window, window_box


@_no_autograph
def decode_and_random_resized_crop(
    encoded: tf.Tensor,
    size: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    seed: tf.Tensor,
) -> tf.Tensor:
    """`random_resized_crop` of one JPEG image that decodes only the crop's window.

    The box is drawn from the header's height and width with the same seed, so it is the
    box `random_resized_crop(decode(encoded)[None], ...)` draws; the window around the
    pixels that box samples is decoded (`tf.image.decode_and_crop_jpeg`) and resized with
    the same sample positions, so the crop equals the whole-image path's up to float
    rounding of the positions.

    Args:
        encoded: scalar string tensor, JPEG bytes.
        size: output height and width.
        scale: (min, max) fraction of the image area kept.
        ratio: (min, max) aspect ratio (width / height) of the crop.
        seed: int tensor of shape [2].

    Returns:
        float32 [size, size, 3] in [0, 1].
    """
    shape = tf.image.extract_jpeg_shape(encoded)
    box = sample_crop_boxes(1, shape[0], shape[1], scale, ratio, seed)[0]
    window, window_box = crop_window(box, shape[0], shape[1], size)
    image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
    crop = tf.image.crop_and_resize(image[None], window_box[None], [0], [size, size], method="bilinear")
    return tf.clip_by_value(crop[0] / 255.0, 0.0, 1.0)


@_no_autograph
def random_resized_crop(
    images: tf.Tensor,
    size: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    seed: tf.Tensor,
) -> tf.Tensor:
    """Random resized crop with an independent box per image.

    Args:
        images: [B, H, W, C] uint8 or float in [0, 1].
        size: output height and width.
        scale: (min, max) fraction of the image area kept.
        ratio: (min, max) aspect ratio (width / height) of the crop.
        seed: int tensor of shape [2].

    Returns:
        float32 [B, size, size, C] in [0, 1].
    """
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    boxes = sample_crop_boxes(shape[0], shape[1], shape[2], scale, ratio, seed)
    return crop_and_resize_boxes(images, boxes, size)


@_no_autograph
def center_crop_resize(images: tf.Tensor, size: int, crop_fraction: float | None = None) -> tf.Tensor:
    """Deterministic evaluation preprocessing: centred square crop, then resize.

    Args:
        images: [B, H, W, C] or [H, W, C], uint8 or float in [0, 1], C in {1, 3}.
        size: output height and width.
        crop_fraction: side of the square crop as a fraction of the shorter image side;
            default 0.875 (224 of 256, as the reference) when the shorter side is larger
            than `size`, else 1.0 (small images such as MNIST / CIFAR are kept whole).

    Returns:
        float32 [B, size, size, 3] (or [size, size, 3]) in [0, 1]: the encoder's input.
    """
    images = tf.convert_to_tensor(images)
    single = images.shape.rank == 3
    if single:
        images = images[None]
    shape = tf.shape(images)
    height = tf.cast(shape[1], tf.float32)
    width = tf.cast(shape[2], tf.float32)
    shorter = tf.minimum(height, width)
    if crop_fraction is None:
        fraction = tf.where(shorter > size, 0.875, 1.0)
    else:
        fraction = tf.constant(crop_fraction, tf.float32)
    side = fraction * shorter
    top = 0.5 * (height - side) / height
    left = 0.5 * (width - side) / width
    box = tf.stack([top, left, top + side / height, left + side / width])
    boxes = tf.tile(box[None], tf.stack([shape[0], 1]))
    out = _ensure_rgb(crop_and_resize_boxes(images, boxes, size))
    return out[0] if single else out


# ------------------------------------------------------------------ view parameters


@_no_autograph
def sample_view_params(batch_size, view: ViewConfig, seed: tf.Tensor) -> dict[str, tf.Tensor]:
    """Draws the per-image parameters of one view's post-crop pipeline.

    Args:
        batch_size: number of images (int or scalar tensor).
        view: the view distribution.
        seed: int tensor of shape [2].

    Returns:
        A dict of [B] tensors: boolean `flip`, `jitter`, `grayscale`, `blur`, `solarize`
        (whether each op fires); float `brightness` (additive delta), `contrast` and
        `saturation` (factors), `hue` (delta in turns), `blur_sigma` (pixels); and int32
        `jitter_order` [B, 4], a permutation of (brightness, contrast, saturation, hue).
    """
    seeds = tf.unstack(_split(seed, 11))
    shape = tf.reshape(tf.cast(batch_size, tf.int32), [1])

    def fires(index, probability):
        # `<` so that probability 0 never fires and 1 always does (uniform is in [0, 1)).
        return tf.random.stateless_uniform(shape, seeds[index]) < probability

    def uniform(index, low, high):
        return tf.random.stateless_uniform(shape, seeds[index], minval=low, maxval=high)

    order_keys = tf.random.stateless_uniform(tf.concat([shape, [_NUM_JITTER_OPS]], 0), seeds[6])
    return {
        "flip": fires(0, view.flip_prob),
        "jitter": fires(1, view.color_jitter_prob),
        # Brightness as in the reference: an additive delta, not torchvision's factor.
        "brightness": uniform(2, -view.brightness, view.brightness),
        "contrast": uniform(3, 1.0 - view.contrast, 1.0 + view.contrast),
        "saturation": uniform(4, 1.0 - view.saturation, 1.0 + view.saturation),
        "hue": uniform(5, -view.hue, view.hue),
        "jitter_order": tf.argsort(order_keys, axis=1),
        "grayscale": fires(7, view.grayscale_prob),
        "blur": fires(8, view.blur_prob),
        "blur_sigma": uniform(9, view.blur_sigma[0], view.blur_sigma[1]),
        "solarize": fires(10, view.solarize_prob),
    }


@_no_autograph
def apply_view_params(
    images: tf.Tensor,
    params: dict[str, tf.Tensor],
    view: ViewConfig,
    *,
    flip: bool = True,
    static_shapes: bool = False,
) -> tf.Tensor:
    """Applies flip, colour jitter, grayscale, blur and solarise with given parameters.

    Args:
        images: [B, S, S, C] uint8 or float in [0, 1], C in {1, 3}; S must be static
            (it sets the blur kernel size).
        params: from `sample_view_params` for the same batch size (`flip` may be absent
            when `flip` is False).
        view: the view distribution (its magnitudes decide which ops can be skipped).
        flip: apply the flips (False: the images were flipped already, `host_views`).
        static_shapes: compute each op on the whole batch and select per image, instead of
            partitioning the batch and computing each op only where it applies. Same values;
            more arithmetic but no data-dependent shapes, which XLA (`jit_compile`) needs
            and accelerators prefer.

    Returns:
        float32 [B, S, S, 3] in [0, 1].
    """
    images = to_float_rgb(images)

    def per_image(mask):
        return mask[:, None, None, None]

    if flip:
        images = tf.where(per_image(params["flip"]), tf.reverse(images, axis=[2]), images)
    if view.color_jitter_prob > 0:
        jitter = _color_jitter_static if static_shapes else _color_jitter
        images = jitter(images, params, view)
    if view.grayscale_prob > 0:
        images = tf.where(per_image(params["grayscale"]), _grayscale(images), images)
    if view.blur_prob > 0:
        radius = _blur_radius(images.shape[1])
        if radius > 0:
            if static_shapes:
                blurred = gaussian_blur(images, params["blur_sigma"], radius)
                images = tf.where(per_image(params["blur"]), blurred, images)
            else:
                images = _apply_where(
                    params["blur"],
                    lambda x, sigma: gaussian_blur(x, sigma, radius),
                    images,
                    params["blur_sigma"],
                )
    if view.solarize_prob > 0:
        solarized = tf.where(images >= view.solarize_threshold, 1.0 - images, images)
        images = tf.where(per_image(params["solarize"]), solarized, images)
    return tf.clip_by_value(images, 0.0, 1.0)


@_no_autograph
def view_transform(images: tf.Tensor, view: ViewConfig, seed: tf.Tensor) -> tf.Tensor:
    """The post-crop part of one view: flip, jitter, grayscale, blur, solarise.

    Args:
        images: [B, S, S, C] uint8 or float in [0, 1] (already cropped to the output size).
        view: the view distribution.
        seed: int tensor of shape [2].

    Returns:
        float32 [B, S, S, 3] in [0, 1].
    """
    images = tf.convert_to_tensor(images)
    params = sample_view_params(tf.shape(images)[0], view, seed)
    return apply_view_params(images, params, view)


@_no_autograph
def crop_views(images: tf.Tensor, augment: AugmentConfig, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The random resized crops of both views, float32 [B, S, S, 3] in [0, 1]."""
    seed1, seed2 = tf.unstack(_split(seed, 2))
    size = augment.image_size
    crop1 = random_resized_crop(images, size, augment.view1.crop_scale, augment.view1.crop_ratio, seed1)
    crop2 = random_resized_crop(images, size, augment.view2.crop_scale, augment.view2.crop_ratio, seed2)
    return _ensure_rgb(crop1), _ensure_rgb(crop2)


@_no_autograph
def jpeg_crop_views(encoded: tf.Tensor, augment: AugmentConfig, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`crop_views` of one JPEG image, decoding only each view's window: float32 [S, S, 3] each.

    Same seeds, same boxes as `crop_views(decode(encoded)[None], augment, seed)`.
    """
    seed1, seed2 = tf.unstack(_split(seed, 2))
    size = augment.image_size
    return (
        decode_and_random_resized_crop(encoded, size, augment.view1.crop_scale, augment.view1.crop_ratio, seed1),
        decode_and_random_resized_crop(encoded, size, augment.view2.crop_scale, augment.view2.crop_ratio, seed2),
    )


@_no_autograph
def transform_views(
    crop1: tf.Tensor, crop2: tf.Tensor, augment: AugmentConfig, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """`view_transform` of each view's crops, with independent sub-seeds."""
    seed1, seed2 = tf.unstack(_split(seed, 2))
    return view_transform(crop1, augment.view1, seed1), view_transform(crop2, augment.view2, seed2)


@_no_autograph
def two_views(images: tf.Tensor, augment: AugmentConfig, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """BYOL's two augmented views of one batch of decoded images.

    Args:
        images: [B, H, W, C] uint8 or float in [0, 1], C in {1, 3}.
        augment: image size and the two view distributions.
        seed: int tensor of shape [2]; crops and transforms of each view use independent
            sub-seeds derived from it.

    Returns:
        (view1, view2), each float32 [B, S, S, 3] in [0, 1] with S = augment.image_size.
    """
    crop_seed, transform_seed = tf.unstack(_split(seed, 2))
    crop1, crop2 = crop_views(images, augment, crop_seed)
    return transform_views(crop1, crop2, augment, transform_seed)


# ---------------------------------------------------------- augmentation placement

PLACEMENTS = AUGMENT_PLACEMENTS
# The per-image parameters `host_views` packs, one float32 column each (flags as 0 / 1,
# the jitter order as 4 integer-valued columns); the flip is applied on the host.
_PACKED_FLOATS = ("jitter", "brightness", "contrast", "saturation", "hue", "grayscale", "blur", "blur_sigma", "solarize")
_PACKED_FLAGS = ("jitter", "grayscale", "blur", "solarize")
PACKED_PARAMS = len(_PACKED_FLOATS) + _NUM_JITTER_OPS


def resolve_placement(placement: str) -> str:
    """`augment.placement` made concrete: "auto" is "device" when TensorFlow sees a GPU or a
    TPU, else "host"."""
    if placement not in PLACEMENTS:
        raise ValueError(f"augment.placement: {placement!r} is not one of {', '.join(PLACEMENTS)}")
    if placement != "auto":
        return placement
    accelerators = tf.config.list_logical_devices("GPU") + tf.config.list_logical_devices("TPU")
    return "device" if accelerators else "host"


def pack_view_params(params: dict[str, tf.Tensor]) -> tf.Tensor:
    """`sample_view_params`' output but the flip as one float32 [B, PACKED_PARAMS] tensor."""
    columns = [tf.cast(params[name], tf.float32)[:, None] for name in _PACKED_FLOATS]
    columns.append(tf.cast(params["jitter_order"], tf.float32))
    return tf.concat(columns, axis=1)


def unpack_view_params(packed: tf.Tensor) -> dict[str, tf.Tensor]:
    """Inverse of `pack_view_params` (without "flip")."""
    packed = tf.convert_to_tensor(packed, tf.float32)
    count = len(_PACKED_FLOATS)
    params = {name: packed[:, index] for index, name in enumerate(_PACKED_FLOATS)}
    for name in _PACKED_FLAGS:
        params[name] = params[name] > 0.5
    params["jitter_order"] = tf.cast(tf.round(packed[:, count:]), tf.int32)
    return params


def to_uint8(images: tf.Tensor) -> tf.Tensor:
    """Float images in [0, 1] rounded to uint8."""
    return tf.cast(tf.round(tf.clip_by_value(images, 0.0, 1.0) * 255.0), tf.uint8)


@_no_autograph
def host_views(
    crop1: tf.Tensor, crop2: tf.Tensor, augment: AugmentConfig, seed: tf.Tensor
) -> dict[str, tf.Tensor]:
    """The host's share of `transform_views` when augmentation runs on the accelerator.

    Draws each view's per-image parameters exactly as `transform_views` does (same seed,
    same sub-seeds), applies the flips, and returns the crops as uint8 with the remaining
    parameters packed beside them; `device_views` applies the rest. Parameters travel with
    the batch rather than seeds: a split over replicas or micro-batches slices them with
    their images, and the accelerator draws no random numbers (its random-number algorithm
    may differ from the host's).

    Args:
        crop1, crop2: [B, S, S, C] uint8 or float in [0, 1], each view's crops.
        augment: the two view distributions.
        seed: int tensor of shape [2] (`transform_views`' seed).

    Returns:
        {"crop1", "crop2": uint8 [B, S, S, 3] (flipped), "params1", "params2": float32
        [B, PACKED_PARAMS]}.
    """
    out = {}
    seeds = tf.unstack(_split(seed, 2))
    for index, (crops, view, view_seed) in enumerate(
        ((crop1, augment.view1, seeds[0]), (crop2, augment.view2, seeds[1])), start=1
    ):
        images = to_float_rgb(crops)
        params = sample_view_params(tf.shape(images)[0], view, view_seed)
        images = tf.where(params["flip"][:, None, None, None], tf.reverse(images, axis=[2]), images)
        out[f"crop{index}"] = to_uint8(images)
        out[f"params{index}"] = pack_view_params(params)
    return out


@_no_autograph
def device_views(batch: dict[str, tf.Tensor], augment: AugmentConfig) -> tuple[tf.Tensor, tf.Tensor]:
    """The accelerator's share: colour jitter, grayscale, blur and solarise of `host_views`'
    batch, with static shapes (XLA). Returns (view1, view2), float32 [B, S, S, 3] in [0, 1]."""
    return tuple(
        apply_view_params(
            batch[f"crop{index}"],
            unpack_view_params(batch[f"params{index}"]),
            view,
            flip=False,
            static_shapes=True,
        )
        for index, view in ((1, augment.view1), (2, augment.view2))
    )


# ------------------------------------------------------------------------ colour ops


def _grayscale(images: tf.Tensor) -> tf.Tensor:
    luma = tf.tensordot(images, tf.constant(_GRAYSCALE_WEIGHTS, tf.float32), axes=[[-1], [0]])
    return tf.repeat(luma[..., None], 3, axis=-1)


def _adjust_brightness(images, delta):
    return images + delta[:, None, None, None]


def _adjust_contrast(images, factor):
    # Per-channel mean, as the reference and tf.image.adjust_contrast.
    mean = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
    return factor[:, None, None, None] * (images - mean) + mean


def _adjust_saturation(images, factor):
    # Equal to HSV -> S = clip(S * factor, 0, 1) -> RGB (tf.image.adjust_saturation)
    # without the round trip: with V = max and H fixed, every channel is V - S * V * g(H),
    # so scaling S scales each channel's distance below V. S * factor > 1 clips S to 1,
    # i.e. a ratio of 1 / S = V / (V - min).
    value = tf.reduce_max(images, axis=-1, keepdims=True)
    spread = value - tf.reduce_min(images, axis=-1, keepdims=True)
    factor = factor[:, None, None, None]
    ratio = tf.where(factor * spread > value, tf.math.divide_no_nan(value, spread), factor)
    return value - ratio * (value - images)


def _adjust_hue(images, delta):
    hsv = tf.image.rgb_to_hsv(images)
    hue = tf.math.floormod(hsv[..., :1] + delta[:, None, None, None], 1.0)
    return tf.image.hsv_to_rgb(tf.concat([hue, hsv[..., 1:]], axis=-1))


_JITTER_FUNCTIONS = {
    _BRIGHTNESS: ("brightness", _adjust_brightness),
    _CONTRAST: ("contrast", _adjust_contrast),
    _SATURATION: ("saturation", _adjust_saturation),
    _HUE: ("hue", _adjust_hue),
}


def _color_jitter(images: tf.Tensor, params: dict[str, tf.Tensor], view: ViewConfig) -> tf.Tensor:
    """Brightness, contrast, saturation and hue in a per-image random order.

    At step j every image applies its j-th op. Rather than computing all four ops on the
    whole batch at each step (16 op evaluations, 4 of them HSV round trips), the batch is
    partitioned by op and each part gets only its own op; images that skip jitter form a
    fifth, untouched part. Each op clips to [0, 1], as the reference.
    """
    static_shape = images.shape
    batch_size = tf.shape(images)[0]
    indices = tf.range(batch_size)
    identity = _NUM_JITTER_OPS
    for step in range(_NUM_JITTER_OPS):
        op = tf.where(params["jitter"], params["jitter_order"][:, step], identity)
        image_parts = tf.dynamic_partition(images, op, _NUM_JITTER_OPS + 1)
        index_parts = tf.dynamic_partition(indices, op, _NUM_JITTER_OPS + 1)
        outputs = []
        for op_index in range(_NUM_JITTER_OPS):
            name, function = _JITTER_FUNCTIONS[op_index]
            if getattr(view, name) == 0:  # a zero magnitude is the identity
                outputs.append(image_parts[op_index])
                continue
            magnitude = tf.dynamic_partition(params[name], op, _NUM_JITTER_OPS + 1)[op_index]
            outputs.append(tf.clip_by_value(function(image_parts[op_index], magnitude), 0.0, 1.0))
        outputs.append(image_parts[identity])
        images = tf.dynamic_stitch(index_parts, outputs)
        images = tf.ensure_shape(images, static_shape)
    return images


def _color_jitter_static(images: tf.Tensor, params: dict[str, tf.Tensor], view: ViewConfig) -> tf.Tensor:
    """`_color_jitter` with every op computed on the whole batch at each step and the
    image's own op selected: the same values, with static shapes."""
    static_shape = images.shape
    for step in range(_NUM_JITTER_OPS):
        op = tf.where(params["jitter"], params["jitter_order"][:, step], _NUM_JITTER_OPS)[:, None, None, None]
        result = images
        for op_index in range(_NUM_JITTER_OPS):
            name, function = _JITTER_FUNCTIONS[op_index]
            if getattr(view, name) == 0:
                continue
            adjusted = tf.clip_by_value(function(images, params[name]), 0.0, 1.0)
            result = tf.where(tf.equal(op, op_index), adjusted, result)
        images = tf.ensure_shape(result, static_shape)
    return images


# ------------------------------------------------------------------------------ blur


def _blur_radius(size: int | None) -> int:
    if size is None:
        raise ValueError("blur needs a static image size (the kernel size is size / 10)")
    # As the reference: kernel = 2 * int(size / 10 / 2) + 1, i.e. 3 at 32 px, 23 at 224 px,
    # and no blur below 20 px.
    return int(size / _BLUR_DIVIDER / 2)


@_no_autograph
def gaussian_kernels(sigma: tf.Tensor, radius: int) -> tf.Tensor:
    """Normalised 1-D Gaussian kernels, one per sigma: float32 [B, 2 * radius + 1]."""
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    sigma = tf.cast(sigma, tf.float32)[:, None]
    kernels = tf.exp(-tf.square(offsets) / (2.0 * tf.square(sigma)))
    return kernels / tf.reduce_sum(kernels, axis=1, keepdims=True)


@_no_autograph
def gaussian_blur(images: tf.Tensor, sigma: tf.Tensor, radius: int) -> tf.Tensor:
    """Separable Gaussian blur with a different sigma per image.

    Two depthwise convolutions with the batch stacked into channels: the B images' C channels
    become B*C channels of one image, so each image keeps its own kernel, and each pass is one
    convolution instead of 2 * radius + 1 shifted multiply-adds (the speed-up is measured in
    benchmarks/RESULTS.md).
    Deviation from the reference: reflect padding instead of zeros, so borders keep their
    brightness (zero padding darkens a 32 px image's edge rows by up to a third).

    Args:
        images: float32 [B, H, W, C]; B may be 0 (`_apply_where` when no image is blurred).
        sigma: float32 [B], in pixels.
        radius: kernel radius in pixels; 0 returns the images.

    Returns:
        float32 [B, H, W, C].
    """
    if radius == 0:
        return images
    # Convolution filters must not be empty, so an empty batch is returned as it is.
    blurred = tf.cond(
        tf.shape(images)[0] > 0, lambda: _depthwise_blur(images, sigma, radius), lambda: images
    )
    return tf.ensure_shape(blurred, images.shape)


def _depthwise_blur(images: tf.Tensor, sigma: tf.Tensor, radius: int) -> tf.Tensor:
    batch, height, width, channels = (tf.shape(images)[i] for i in range(4))
    taps = 2 * radius + 1
    # [B, taps] -> [taps, B*C]: every channel of image b gets image b's kernel.
    kernels = tf.reshape(tf.repeat(tf.transpose(gaussian_kernels(sigma, radius)), channels, axis=1), [taps, -1])
    stacked = tf.reshape(tf.transpose(images, [1, 2, 0, 3]), [1, height, width, batch * channels])
    for axis, length in ((1, height), (2, width)):
        # Reflect padding (edge pixel not repeated) as a gather of positions -r .. length-1+r.
        positions = tf.abs(tf.range(-radius, length + radius))
        positions = (length - 1) - tf.abs((length - 1) - positions)
        padded = tf.gather(stacked, positions, axis=axis)
        shape = [taps, 1] if axis == 1 else [1, taps]
        filters = tf.reshape(kernels, [*shape, -1, 1])
        stacked = tf.nn.depthwise_conv2d(padded, filters, [1, 1, 1, 1], "VALID")
    return tf.transpose(tf.reshape(stacked, [height, width, batch, channels]), [2, 0, 1, 3])


def _apply_where(mask: tf.Tensor, function, images: tf.Tensor, *per_image_args: tf.Tensor) -> tf.Tensor:
    """`function` on the images where `mask` holds, others unchanged, computing only those."""
    mask = tf.cast(mask, tf.int32)
    indices = tf.range(tf.shape(images)[0])
    kept, chosen = tf.dynamic_partition(images, mask, 2)
    kept_indices, chosen_indices = tf.dynamic_partition(indices, mask, 2)
    args = [tf.dynamic_partition(arg, mask, 2)[1] for arg in per_image_args]
    out = tf.dynamic_stitch([kept_indices, chosen_indices], [kept, function(chosen, *args)])
    return tf.ensure_shape(out, images.shape)
