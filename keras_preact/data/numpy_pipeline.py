"""CIFAR-style augmentation and batching in numpy, for any Keras backend.

This is the in-memory pipeline the trainers use under JAX and PyTorch (and on
machines without TensorFlow): 4-pixel zero padding, a random crop back to the
input size, a random horizontal flip and per-channel mean/std normalization,
as in Sec. 4 of He et al. 2016 ("Identity Mappings in Deep Residual Networks")
and the CIFAR recipe of He et al. 2015 it follows; optionally random erasing
(Zhong et al., AAAI 2020), beyond the paper.
"""

import keras
import numpy as np


def channel_stats(images):
    """Per-channel mean and standard deviation of uint8 images, in [0, 1] units.

    Args:
        images: uint8 array of shape `(N, H, W, C)`.

    Returns:
        `(mean, std)`, each a float32 array of shape `(C,)`.
    """
    x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return x.mean(0).astype(np.float32), x.std(0).astype(np.float32)


def normalize(images, mean, std):
    """Maps uint8 images to float32 `(x / 255 - mean) / std`."""
    return ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


def pass_order(n, seed, data_pass):
    """The example order of pass `data_pass` over `n` training examples: the one seeding
    rule of the in-memory streams (`ArrayDataset` and `tfdata.array_dataset`).

    Example:

    >>> pass_order(5, seed=0, data_pass=0).tolist() == pass_order(5, 0, 0).tolist()
    True
    """
    return np.random.default_rng([seed, data_pass]).permutation(n)


def example_order(n, batch_size, seed, start_batch=0):
    """Yields, pass after pass, the example indices of the training stream from global
    batch `start_batch` on: each pass is `pass_order` cut to whole batches, so global batch
    `b` holds the same examples in every stream built with `seed`.

    Example:

    >>> first = next(example_order(10, 4, seed=0))
    >>> len(first), sorted(first) == sorted(set(first))
    (8, True)
    >>> bool((next(example_order(10, 4, seed=0, start_batch=1)) == first[4:]).all())
    True
    """
    per_pass = n // batch_size
    data_pass, within = divmod(start_batch, per_pass)
    while True:
        order = pass_order(n, seed, data_pass)[: per_pass * batch_size]
        yield order[within * batch_size :]
        data_pass, within = data_pass + 1, 0


def _part(n, part):
    """`(draws, rows)`: the number of images the random draws are made for, and the rows of
    them that `images` are (`part=(rows, total)`: a slice of a batch of `total`)."""
    return (n, slice(None)) if part is None else (part[1], part[0])


def pad_crop_flip(images, rng, *, padding=4, flip=True, part=None):
    """Random crop of zero-padded images, and random horizontal flips.

    Args:
        images: array of shape `(N, H, W, C)`.
        rng: a `numpy.random.Generator`.
        padding: pixels of zero padding on each side before cropping back to
            `(H, W)`.
        flip: whether to flip each image left-right with probability 1/2.
        part: `(rows, total)` when `images` are the rows `rows` (a slice) of a batch of
            `total`: they are augmented as in that batch (the draws are the batch's), as
            one process of a multi-process run does with its share.

    Returns:
        An array of the same shape and dtype.

    Example:

    >>> x = np.zeros((2, 28, 28, 1), np.uint8)
    >>> pad_crop_flip(x, np.random.default_rng(0)).shape
    (2, 28, 28, 1)
    """
    n, h, w, _ = images.shape
    draws, mine = _part(n, part)
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    dy = rng.integers(0, 2 * padding + 1, size=draws)[mine]
    dx = rng.integers(0, 2 * padding + 1, size=draws)[mine]
    rows = dy[:, None] + np.arange(h)[None, :]  # (n, h)
    cols = dx[:, None] + np.arange(w)[None, :]  # (n, w)
    if flip:
        flipped = (rng.random(draws) < 0.5)[mine]
        cols = np.where(flipped[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def random_erasing(
    images,
    rng,
    *,
    probability=0.5,
    area=(0.02, 0.4),
    aspect=(0.3, 1 / 0.3),
    max_tries=10,
    part=None,
):
    """Random erasing (Zhong et al., AAAI 2020): a random rectangle of random pixels.

    Each image is erased with probability `probability`: a rectangle whose area is a
    uniform fraction in `area` of the image and whose aspect ratio (height / width) is
    log-uniform in `aspect` is filled with uniform random values (0-255 for integer
    images, [0, 1) for float ones). A rectangle that does not fit is drawn again, up to
    `max_tries` times; an image with none that fits is left as is (the paper retries until
    one fits; with the defaults on 28x28 images almost every image finds one within 10).

    Args:
        images: array `(N, H, W, C)`, uint8 or float (channels last).
        rng: a `numpy.random.Generator`.
        probability: chance that an image is erased, in [0, 1].
        area: `(min, max)` fraction of the image area erased, 0 < min <= max <= 1.
        aspect: `(min, max)` aspect ratio of the rectangle, 0 < min <= max.
        max_tries: draws of a rectangle per image before giving up on it.
        part: `(rows, total)`, as for `pad_crop_flip`.

    Returns:
        A new array of the same shape and dtype.

    Example:

    >>> x = np.zeros((4, 28, 28, 1), np.uint8)
    >>> y = random_erasing(x, np.random.default_rng(0), probability=1.0)
    >>> y.shape, bool((y != 0).any())
    ((4, 28, 28, 1), True)
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability={probability!r} must be in [0, 1].")
    if not (0.0 < area[0] <= area[1] <= 1.0):
        raise ValueError(f"area={area!r} must be (min, max) with 0 < min <= max <= 1.")
    if not (0.0 < aspect[0] <= aspect[1]):
        raise ValueError(f"aspect={aspect!r} must be (min, max) with 0 < min <= max.")
    images = np.asarray(images)
    h, w = images.shape[1:3]
    n, mine = _part(len(images), part)
    erase = rng.random(n) < probability
    top = np.zeros(n, np.int64)
    left = np.zeros(n, np.int64)
    eh = np.zeros(n, np.int64)
    ew = np.zeros(n, np.int64)
    todo = erase.copy()
    for _ in range(max_tries):
        if not todo.any():
            break
        target = rng.uniform(area[0], area[1], n) * h * w
        ratio = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1]), n))
        hh = np.round(np.sqrt(target * ratio)).astype(np.int64)
        ww = np.round(np.sqrt(target / ratio)).astype(np.int64)
        fits = todo & (hh >= 1) & (ww >= 1) & (hh < h) & (ww < w)
        t = (rng.random(n) * (h - hh + 1)).astype(np.int64)
        left_ = (rng.random(n) * (w - ww + 1)).astype(np.int64)
        top[fits], left[fits], eh[fits], ew[fits] = t[fits], left_[fits], hh[fits], ww[fits]
        todo &= ~fits
    top, left, eh, ew, erase = (a[mine] for a in (top, left, eh, ew, erase))
    rows = np.arange(h)[None, :]
    cols = np.arange(w)[None, :]
    inside = ((rows >= top[:, None]) & (rows < (top + eh)[:, None]))[:, :, None] & (
        (cols >= left[:, None]) & (cols < (left + ew)[:, None])
    )[:, None, :]
    inside &= (erase & (eh > 0))[:, None, None]
    shape = (n, *images.shape[1:])  # the batch's noise, of which these rows take theirs
    if images.dtype == np.uint8:
        noise = rng.integers(0, 256, shape, dtype=np.uint8)
    elif np.issubdtype(images.dtype, np.integer):
        noise = rng.integers(0, 256, shape).astype(images.dtype)
    else:
        noise = rng.random(shape, dtype=np.float32).astype(images.dtype)
    noise = noise[mine]
    return np.where(inside[..., None], noise, images)


class ArrayDataset(keras.utils.PyDataset):
    """Batches of augmented, normalized images from in-memory arrays.

    The example order is a fixed function of `seed` and the global batch
    index, so a resumed run (`epoch` set to the epoch it restarts at) sees the
    same batches as an uninterrupted one, and `steps_per_epoch` need not divide
    the dataset: the stream of shuffled passes over the data simply continues.
    The trainer builds one at every epoch start (`cifar.MemoryData.train`) with its
    `epoch` and `offset`, the batches of that epoch already trained (a resume inside an
    epoch); the dataset does not count epochs itself, because Keras calls a PyDataset's
    `on_epoch_end` also when it resets its iterator, not only at an epoch's end.

    Args:
        images: uint8 array `(N, H, W, C)`.
        labels: int array `(N,)`.
        batch_size: global batch size.
        mean: per-channel mean in [0, 1] units.
        std: per-channel standard deviation in [0, 1] units.
        training: shuffle, augment and drop the last partial batch if True;
            otherwise one ordered pass, keeping the last partial batch.
        steps_per_epoch: batches per Keras epoch when training (default: one
            pass over the data, rounded down).
        padding: padding for the random crop (0 disables cropping).
        flip: random horizontal flips.
        erasing: probability of `random_erasing` per training image (0 disables it).
        seed: integer seed.
        normalize: map images to float32 `(x / 255 - mean) / std`; if False, batches stay
            uint8 (4x fewer bytes to the accelerator) and the model normalizes them.
        shard: `(index, count)`: this process's share of every global batch, rows
            `[index * b, (index + 1) * b)` with `b = batch_size // count`, augmented as in
            the global batch (one process of `count` reads only its share). An evaluation
            batch's share may be short or empty at the end of the data.

    Example:

    >>> x = np.zeros((10, 28, 28, 1), np.uint8); y = np.zeros(10, np.int64)
    >>> ds = ArrayDataset(x, y, 4, [0.5], [0.25], training=True)
    >>> len(ds), ds[0][0].shape
    (2, (4, 28, 28, 1))
    """

    def __init__(
        self,
        images,
        labels,
        batch_size,
        mean,
        std,
        *,
        training,
        steps_per_epoch=None,
        padding=4,
        flip=True,
        erasing=0.0,
        seed=0,
        normalize=True,
        shard=(0, 1),
        **kwargs,
    ):
        super().__init__(**kwargs)
        if len(images) != len(labels):
            raise ValueError(f"images and labels differ in length: {len(images)} vs {len(labels)}.")
        if training and len(images) < batch_size:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {len(images)} training examples."
            )
        self.images, self.labels = images, np.asarray(labels)
        self.batch_size, self.training = batch_size, training
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.padding, self.flip, self.seed = padding, flip, seed
        self.normalize = normalize
        if not 0.0 <= erasing <= 1.0:
            raise ValueError(f"erasing={erasing!r} must be a probability in [0, 1].")
        self.erasing = erasing
        index, count = shard
        if batch_size % count or not 0 <= index < count:
            raise ValueError(
                f"shard={shard!r}: batch_size={batch_size} must divide into `count` shares "
                f"and 0 <= index < count."
            )
        self.shard_batch = batch_size // count
        self.mine = slice(index * self.shard_batch, (index + 1) * self.shard_batch)
        self.batches_per_pass = len(images) // batch_size
        self.steps_per_epoch = steps_per_epoch or self.batches_per_pass
        self.epoch = 0
        self.offset = 0  # batches of `epoch` already trained (a run resumed mid-epoch)
        self._orders = {}

    def __len__(self):
        if self.training:
            return self.steps_per_epoch - self.offset
        return -(-len(self.images) // self.batch_size)

    def _order(self, data_pass):
        if data_pass not in self._orders:
            self._orders = {data_pass: pass_order(len(self.images), self.seed, data_pass)}
        return self._orders[data_pass]

    def __getitem__(self, index):
        mine = self.mine
        if not self.training:
            first = index * self.batch_size
            end = min(first + self.batch_size, len(self.images))
            sl = slice(min(first + mine.start, end), min(first + mine.stop, end))
            return self._finish(self.images[sl]), self.labels[sl]
        global_batch = self.epoch * self.steps_per_epoch + self.offset + index
        data_pass, within = divmod(global_batch, self.batches_per_pass)
        idx = self._order(data_pass)[within * self.batch_size : (within + 1) * self.batch_size]
        idx, part = idx[mine], (mine, self.batch_size)
        x = self.images[idx]
        if self.padding or self.flip:
            rng = np.random.default_rng([self.seed, 1, global_batch])
            x = pad_crop_flip(x, rng, padding=self.padding, flip=self.flip, part=part)
        if self.erasing:
            # A stream of its own: turning erasing on leaves the crops and flips unchanged.
            rng = np.random.default_rng([self.seed, 2, global_batch])
            x = random_erasing(x, rng, probability=self.erasing, part=part)
        return self._finish(x), self.labels[idx]

    def _finish(self, images):
        return normalize(images, self.mean, self.std) if self.normalize else images
