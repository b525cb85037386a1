"""ImageNet preprocessing on encoded images, in TensorFlow.

Training crops (both decode only the crop window of a JPEG with
`tf.image.decode_and_crop_jpeg`; other formats are decoded whole, then cropped):

* `"scale"`: the scale augmentation of He et al. 2015 ([1] in the paper): the
  shorter side is resized to s ~ U[256, 480] and a random 224x224 crop taken.
  The crop window is computed in the original image's coordinates (a square of
  side 224 / s * shorter_side), decoded and resized to 224.
* `"inception"`: the scale and aspect-ratio augmentation the paper uses for its
  best ResNet-200 (Szegedy et al. [19], as in [20]): a crop of 8%-100% of the
  area with aspect ratio in [3/4, 4/3], resized to 224. Ten candidates are drawn;
  if none fits, a centre crop with the aspect ratio clamped into range is used.

Then a random horizontal flip and optionally colour jitter and AlexNet-style
PCA lighting noise. Evaluation resizes the shorter side to `resize` and takes
the centre `crop` square (224 from 256; 320 from 320 as in the paper's Table 5).
PNG, GIF, BMP, grayscale and CMYK JPEGs decode to 3-channel RGB (or to one
channel with `channels=1`); an alpha channel is dropped and 16-bit PNGs are scaled to 8 bits.

Small images (Fashion-MNIST, CIFAR, thumbnails: no larger than the crop) take the CIFAR
recipe instead (`preprocess_small_train`): resized to the crop size, padded and randomly
cropped back, flipped; evaluation resizes them to the crop size (`preprocess_small_eval`).
"""

import math

import tensorflow as tf

from keras_preact.imagenet_utils import IMAGENET_MEAN as MEAN_RGB
from keras_preact.imagenet_utils import IMAGENET_STD as STDDEV_RGB

# Eigen-decomposition of the ImageNet RGB covariance used by AlexNet's and
# fb.resnet.torch's lighting noise.
_EIGVAL = (0.2175, 0.0188, 0.0045)
_EIGVEC = (
    (-0.5675, 0.7192, 0.4009),
    (-0.5808, -0.0045, -0.8140),
    (-0.5836, -0.6948, 0.4203),
)
TRAIN_CROPS = ("scale", "inception", "pad")


def _uniform(shape, minval, maxval, seed, dtype=tf.float32):
    if seed is None:
        return tf.random.uniform(shape, minval, maxval, dtype=dtype)
    return tf.random.stateless_uniform(shape, seed, minval, maxval, dtype=dtype)


def image_shape(image_bytes):
    """`[height, width]` of an encoded image, from the header alone for JPEG."""
    return tf.cond(
        tf.io.is_jpeg(image_bytes),
        lambda: tf.image.extract_jpeg_shape(image_bytes)[:2],
        lambda: tf.shape(decode_full(image_bytes))[:2],
    )


def decode_full(image_bytes, channels=3):
    """Decodes a whole JPEG, PNG, GIF or BMP image to uint8 `(H, W, channels)`: RGB, or
    gray with `channels=1` (alpha dropped, 16 bits scaled to 8)."""
    image = tf.io.decode_image(
        image_bytes, channels=channels, dtype=tf.uint8, expand_animations=False
    )
    image.set_shape([None, None, channels])
    return image


def decode_crop(image_bytes, window, channels=3):
    """Decodes `window = [y, x, h, w]` of an image, only that window for JPEG.

    Returns:
        A uint8 `(h, w, channels)` tensor.
    """
    window = tf.cast(window, tf.int32)

    def fused():
        return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=channels)

    def full():
        image = decode_full(image_bytes, channels)
        return image[window[0] : window[0] + window[2], window[1] : window[1] + window[3]]

    image = tf.cond(tf.io.is_jpeg(image_bytes), fused, full)
    image.set_shape([None, None, channels])
    return image


def decode_then_crop(image_bytes, window, channels=3):
    """Like `decode_crop` but always decodes the whole image (benchmark baseline)."""
    window = tf.cast(window, tf.int32)
    image = decode_full(image_bytes, channels)
    return image[window[0] : window[0] + window[2], window[1] : window[1] + window[3]]


def inception_window(
    shape, *, area_range=(0.08, 1.0), ratio_range=(3 / 4, 4 / 3), attempts=10, seed=None
):
    """Samples a crop window `[y, x, h, w]` by area fraction and aspect ratio (w/h).

    Args:
        shape: `[height, width]` of the image.
        area_range: range of the crop's area as a fraction of the image's.
        ratio_range: range of the crop's width / height, sampled log-uniformly.
        attempts: candidates drawn; the first that fits the image is used.
        seed: stateless seed `(2,)`, or None.

    Returns:
        int32 `[y, x, h, w]`.
    """
    h = tf.cast(shape[0], tf.float32)
    w = tf.cast(shape[1], tf.float32)
    seeds = (
        [None] * 4 if seed is None else tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    )
    area = h * w * _uniform([attempts], area_range[0], area_range[1], seeds[0])
    log_ratio = _uniform([attempts], math.log(ratio_range[0]), math.log(ratio_range[1]), seeds[1])
    ratio = tf.exp(log_ratio)
    cw = tf.round(tf.sqrt(area * ratio))
    ch = tf.round(tf.sqrt(area / ratio))
    fits = (cw <= w) & (ch <= h) & (cw >= 1) & (ch >= 1)
    # Fallback: the largest centred crop whose aspect ratio is clamped into range.
    in_ratio = w / h
    fb_w = tf.where(in_ratio > ratio_range[1], tf.round(h * ratio_range[1]), w)
    fb_h = tf.where(in_ratio < ratio_range[0], tf.round(w / ratio_range[0]), h)
    first = tf.argmax(tf.cast(fits, tf.int32))
    any_fit = tf.reduce_any(fits)
    crop_h = tf.where(any_fit, ch[first], fb_h)
    crop_w = tf.where(any_fit, cw[first], fb_w)
    u = _uniform([2], 0.0, 1.0, seeds[2])
    y = tf.where(any_fit, tf.floor(u[0] * (h - crop_h + 1)), tf.floor((h - crop_h) / 2))
    x = tf.where(any_fit, tf.floor(u[1] * (w - crop_w + 1)), tf.floor((w - crop_w) / 2))
    return tf.cast(tf.stack([y, x, crop_h, crop_w]), tf.int32)


def scale_window(shape, *, size=224, scale_range=(256, 480), seed=None):
    """Crop window of [1]'s scale augmentation, in original-image coordinates.

    Resizing the shorter side to s ~ U[scale_range] and cropping `size` pixels
    is the same as cropping `size * shorter / s` original pixels and resizing
    that square to `size`.
    """
    h = tf.cast(shape[0], tf.float32)
    w = tf.cast(shape[1], tf.float32)
    seeds = (
        [None] * 2 if seed is None else tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    )
    s = _uniform([], float(scale_range[0]), float(scale_range[1]) + 1.0, seeds[0])
    side = tf.maximum(tf.minimum(tf.round(size * tf.minimum(h, w) / s), tf.minimum(h, w)), 1.0)
    u = _uniform([2], 0.0, 1.0, seeds[1])
    y = tf.floor(u[0] * (h - side + 1))
    x = tf.floor(u[1] * (w - side + 1))
    return tf.cast(tf.stack([y, x, side, side]), tf.int32)


def center_window(shape, *, resize=256, crop=224):
    """Window of the centre `crop` after resizing the shorter side to `resize`."""
    h = tf.cast(shape[0], tf.float32)
    w = tf.cast(shape[1], tf.float32)
    side = tf.maximum(tf.round(crop / resize * tf.minimum(h, w)), 1.0)
    crop_h = tf.minimum(side, h)
    crop_w = tf.minimum(side, w)
    y = tf.floor((h - crop_h) / 2)
    x = tf.floor((w - crop_w) / 2)
    return tf.cast(tf.stack([y, x, crop_h, crop_w]), tf.int32)


def _resize(image, size):
    image = tf.image.resize(image, [size, size], method="bilinear", antialias=False)
    return tf.clip_by_value(image, 0.0, 255.0)


def color_jitter(image, strength=0.4, seed=None):
    """Random brightness, contrast and saturation on a float [0, 255] image."""
    seeds = (
        [None] * 3 if seed is None else tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    )
    x = image / 255.0
    if seed is None:
        x = tf.image.random_brightness(x, strength)
        x = tf.image.random_contrast(x, 1 - strength, 1 + strength)
        x = tf.image.random_saturation(x, 1 - strength, 1 + strength)
    else:
        x = tf.image.stateless_random_brightness(x, strength, seeds[0])
        x = tf.image.stateless_random_contrast(x, 1 - strength, 1 + strength, seeds[1])
        x = tf.image.stateless_random_saturation(x, 1 - strength, 1 + strength, seeds[2])
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0


def lighting(image, alphastd=0.1, seed=None):
    """AlexNet PCA lighting noise on a float [0, 255] image."""
    alpha = (
        tf.random.normal([3], stddev=alphastd)
        if seed is None
        else tf.random.stateless_normal([3], seed, stddev=alphastd)
    )
    rgb = tf.linalg.matvec(tf.constant(_EIGVEC), alpha * tf.constant(_EIGVAL))
    return tf.clip_by_value(image + 255.0 * rgb, 0.0, 255.0)


def normalize(image):
    """float [0, 255] RGB -> (x / 255 - mean) / std."""
    return (image / 255.0 - tf.constant(MEAN_RGB)) / tf.constant(STDDEV_RGB)


def preprocess_train(
    image_bytes,
    *,
    crop="inception",
    size=224,
    scale_range=(256, 480),
    area_range=(0.08, 1.0),
    ratio_range=(3 / 4, 4 / 3),
    flip=True,
    color=False,
    fused=True,
    channels=3,
    padding=None,
    seed=None,
):
    """Encoded image -> augmented float32 `(size, size, channels)` in [0, 255].

    Args:
        image_bytes: scalar string tensor (JPEG, PNG, GIF or BMP).
        crop: `"inception"` (area and aspect ratio) or `"scale"` ([1]).
        size: output side.
        scale_range: shorter-side range of the `"scale"` crop.
        area_range: area-fraction range of the `"inception"` crop.
        ratio_range: aspect-ratio range of the `"inception"` crop.
        flip: random horizontal flip.
        color: colour jitter (0.4) and PCA lighting (0.1) as in fb.resnet.torch.
        fused: decode only the crop window (`decode_and_crop_jpeg`).
        channels: 3 (RGB) or 1 (gray).
        padding: the `"pad"` crop's padding (`preprocess_small_train`).
        seed: stateless seed `(2,)` for deterministic output, or None.

    Returns:
        float32 `(size, size, channels)`, values in [0, 255].

    Example:

    >>> data = tf.io.encode_jpeg(tf.zeros([300, 400, 3], tf.uint8))
    >>> preprocess_train(data).shape
    TensorShape([224, 224, 3])
    """
    if crop not in TRAIN_CROPS:
        raise ValueError(f"crop must be one of {TRAIN_CROPS}; got {crop!r}.")
    if crop == "pad":
        return preprocess_small_train(image_bytes, size=size, padding=padding, flip=flip,
                                      channels=channels, seed=seed)  # fmt: skip
    seeds = (
        [None] * 4 if seed is None else tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    )
    shape = image_shape(image_bytes)
    if crop == "inception":
        window = inception_window(
            shape, area_range=area_range, ratio_range=ratio_range, seed=seeds[0]
        )
    else:
        window = scale_window(shape, size=size, scale_range=scale_range, seed=seeds[0])
    image = (decode_crop if fused else decode_then_crop)(image_bytes, window, channels)
    image = _resize(tf.cast(image, tf.float32), size)
    if flip:
        image = (
            tf.image.random_flip_left_right(image)
            if seed is None
            else tf.image.stateless_random_flip_left_right(image, seeds[1])
        )
    if color and channels == 3:
        image = lighting(color_jitter(image, seed=seeds[2]), seed=seeds[3])
    image.set_shape([size, size, channels])
    return image


def preprocess_small_train(image_bytes, *, size, padding=None, flip=True, channels=3, seed=None):
    """Encoded small image -> float32 `(size, size, channels)` in [0, 255], the CIFAR recipe:
    resized to `size` (if it is not that size), zero-padded by `padding` pixels (default
    `size / 8` rounded, 4 for 32 and 28), randomly cropped back to `size`, randomly flipped.

    Example:

    >>> data = tf.io.encode_png(tf.zeros([28, 28, 1], tf.uint8))
    >>> preprocess_small_train(data, size=28, channels=1).shape
    TensorShape([28, 28, 1])
    """
    padding = round(size / 8) if padding is None else padding
    image = tf.cast(_to_size(decode_full(image_bytes, channels), size), tf.float32)
    image = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    seeds = (
        [None] * 2 if seed is None else tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    )
    shape = [size, size, channels]
    if seed is None:
        image = tf.image.random_crop(image, shape)
    else:
        image = tf.image.stateless_random_crop(image, shape, seed=seeds[0])
    if flip:
        image = (
            tf.image.random_flip_left_right(image)
            if seed is None
            else tf.image.stateless_random_flip_left_right(image, seeds[1])
        )
    image.set_shape(shape)
    return image


def preprocess_small_eval(image_bytes, *, size, channels=3):
    """Encoded small image -> float32 `(size, size, channels)` in [0, 255]: resized to `size`
    if it is not that size (no crop: a small image is seen whole)."""
    image = tf.cast(_to_size(decode_full(image_bytes, channels), size), tf.float32)
    image.set_shape([size, size, channels])
    return image


def _to_size(image, size):
    """`image` resized to `size` x `size` unless it is that size already (kept exact)."""
    shape = tf.shape(image)
    same = tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))
    return tf.cond(
        same,
        lambda: image,
        lambda: tf.cast(tf.round(_resize(tf.cast(image, tf.float32), size)), tf.uint8),
    )


def preprocess_eval(image_bytes, *, resize=256, crop=224, channels=3):
    """Encoded image -> centre crop float32 `(crop, crop, channels)` in [0, 255].

    Example:

    >>> data = tf.io.encode_png(tf.zeros([300, 400, 1], tf.uint8))
    >>> preprocess_eval(data, resize=320, crop=320).shape
    TensorShape([320, 320, 3])
    """
    window = center_window(image_shape(image_bytes), resize=resize, crop=crop)
    image = _resize(tf.cast(decode_crop(image_bytes, window, channels), tf.float32), crop)
    image.set_shape([crop, crop, channels])
    return image


def ten_crop(image_bytes, *, resize=256, crop=224):
    """The four corner and centre crops and their mirror images: `(10, crop, crop, 3)`."""
    image = tf.cast(decode_full(image_bytes), tf.float32)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resize / tf.minimum(shape[0], shape[1])
    new = tf.cast(tf.round(shape * scale), tf.int32)
    new = tf.maximum(new, crop)
    image = tf.image.resize(image, new, method="bilinear")
    h, w = new[0], new[1]
    offsets = [
        (0, 0),
        (0, w - crop),
        (h - crop, 0),
        (h - crop, w - crop),
        ((h - crop) // 2, (w - crop) // 2),
    ]
    crops = [image[y : y + crop, x : x + crop] for y, x in offsets]
    crops += [tf.image.flip_left_right(c) for c in crops]
    out = tf.clip_by_value(tf.stack(crops), 0.0, 255.0)
    out.set_shape([10, crop, crop, 3])
    return out
