"""Embedded datasets: scikit-learn's digits, out-of-distribution sets, file loaders.

Nothing is downloaded. The in-distribution data is scikit-learn's copy of the
UCI optical digits (1797 greyscale 8x8 images, 10 classes); the OOD sets are
cut from the two photographs scikit-learn ships (``china.jpg``, ``flower.jpg``)
or drawn as noise. Users bring their own data through :func:`load_npz` and
:func:`load_idx` (the MNIST binary format).

Conventions: images are float32 in [0, 1] (intensity as a fraction of full
scale), labels int64; flat tensors are ``(n, 64)``, image tensors
``(n, 1, 8, 8)`` (channels first, as ``torch.nn.Conv2d`` expects). Every random
choice comes from a ``numpy.random.Generator`` seeded by the ``seed`` argument,
so results never depend on (or disturb) PyTorch's global random state.
"""

from __future__ import annotations

import gzip
import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "DigitsData",
    "available_ood_sets",
    "gaussian_noise",
    "image_patches",
    "load_digits_split",
    "load_idx",
    "load_npz",
    "ood_sets",
    "uniform_noise",
]

DIGITS_IMAGE_SHAPE = (8, 8)
# Digits pixels are integer counts 0..16 (set pixels in a 4x4 block of the 32x32 scan).
_DIGITS_MAX = 16.0
# ITU-R BT.601 luma weights for R, G, B.
_LUMA_601 = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True, eq=False, repr=False)
class DigitsData:
    """A fixed split of the digits data, as tensors.

    Attributes
    ----------
    x_train, x_val, x_test : torch.Tensor
        float32 pixel intensities in [0, 1], shape ``(n, 64)`` or ``(n, 1, 8, 8)``.
        ``x_val`` has ``n = 0`` when no validation split was asked for.
    y_train, y_val, y_test : torch.Tensor
        int64 labels in ``0 .. num_classes - 1``, shape ``(n,)``.
    classes : tuple of int
        The original digit behind each label: label ``k`` is digit ``classes[k]``.
    x_heldout : torch.Tensor
        Test-split images of the digits *not* in ``classes`` (an OOD set of
        unseen classes); empty when all ten digits are kept.
    y_heldout : torch.Tensor
        Original digits (0..9, not remapped) of ``x_heldout``, int64.
    heldout_classes : tuple of int
        The digits left out of training, ascending.
    image_shape : tuple of int
        ``(8, 8)``: height and width of one image, in pixels.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[int, ...]
    x_heldout: torch.Tensor
    y_heldout: torch.Tensor
    heldout_classes: tuple[int, ...]
    image_shape: tuple[int, int] = DIGITS_IMAGE_SHAPE

    @property
    def num_classes(self) -> int:
        """Number of classes the model is trained on."""
        return len(self.classes)

    @property
    def num_train(self) -> int:
        """Training-set size N, the ``num_data`` of the posterior."""
        return int(self.y_train.shape[0])

    def __repr__(self) -> str:
        sizes = ", ".join(
            f"{name}={tuple(getattr(self, name).shape)}"
            for name in ("x_train", "x_val", "x_test", "x_heldout")
        )
        return f"DigitsData({sizes}, classes={self.classes})"


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / _DIGITS_MAX).astype(np.float32)
    y = bunch.target.astype(np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _check_fraction(name: str, value: float, *, allow_zero: bool) -> float:
    low_ok = value >= 0 if allow_zero else value > 0
    if isinstance(value, bool) or not isinstance(value, int | float) or not (low_ok and value < 1):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"{name} must be a fraction in {interval}, got {value!r}")
    return float(value)


def _check_classes(classes) -> tuple[int, ...]:
    if classes is None:
        return tuple(range(10))
    try:
        kept = tuple(int(c) for c in classes)
    except (TypeError, ValueError):
        raise ValueError(f"classes must be a sequence of digits 0..9, got {classes!r}") from None
    if any(c != orig for c, orig in zip(kept, classes, strict=True)):
        raise ValueError(f"classes must be integers, got {classes!r}")
    if any(not 0 <= c <= 9 for c in kept):
        raise ValueError(f"classes must be digits 0..9, got {kept}")
    if len(set(kept)) != len(kept):
        raise ValueError(f"classes must not repeat, got {kept}")
    if len(kept) < 2:
        raise ValueError(f"classes must name at least 2 digits, got {kept}")
    return kept


def load_digits_split(
    *,
    test_size: float = 0.2,
    val_size: float = 0.0,
    seed: int = 0,
    classes=None,
    flatten: bool = True,
) -> DigitsData:
    """Load scikit-learn's digits with a fixed stratified train/validation/test split.

    Pixels are ``counts / 16``, so intensities lie in [0, 1]. The test split is
    ``ceil(test_size * 1797)`` images (360 by default), drawn stratified by
    class with ``sklearn.model_selection.train_test_split(random_state=seed)``;
    the validation split is a further stratified ``val_size`` fraction of the
    *training* part, for choosing hyperparameters without touching the test set.

    Held-out classes: with ``classes`` given, only those digits are kept and
    relabelled by position (digit ``classes[k]`` gets label ``k``). The split
    is made on all 1797 images first and then filtered, so the kept test images
    are exactly those of the full split; the test images of the other digits
    become ``x_heldout``, an OOD set of unseen classes.

    Parameters
    ----------
    test_size : float, default 0.2
        Fraction of all images in the test split, in (0, 1).
    val_size : float, default 0.0
        Fraction of the training split moved to the validation split, in [0, 1).
    seed : int, default 0
        Seed of both splits. Keep the default for the project's fixed split.
    classes : sequence of int, optional
        Digits to keep, in label order, at least two. Default: all ten, labels
        equal to digits.
    flatten : bool, default True
        ``(n, 64)`` rows if True, ``(n, 1, 8, 8)`` images if False.

    Returns
    -------
    DigitsData
        The split as tensors, with the class mapping.

    Examples
    --------
    >>> data = load_digits_split()
    >>> tuple(data.x_train.shape), tuple(data.x_test.shape)
    ((1437, 64), (360, 64))
    """
    from sklearn.model_selection import train_test_split

    test_size = _check_fraction("test_size", test_size, allow_zero=False)
    val_size = _check_fraction("val_size", val_size, allow_zero=True)
    kept = _check_classes(classes)

    x, y = _digits_arrays()
    index = np.arange(len(y))
    train_idx, test_idx = train_test_split(
        index, test_size=test_size, random_state=seed, stratify=y
    )
    if val_size > 0:
        train_idx, val_idx = train_test_split(
            train_idx, test_size=val_size, random_state=seed, stratify=y[train_idx]
        )
    else:
        val_idx = index[:0]

    label_of = np.full(10, -1, dtype=np.int64)
    label_of[list(kept)] = np.arange(len(kept))
    shape = (-1, x.shape[1]) if flatten else (-1, 1, *DIGITS_IMAGE_SHAPE)

    def take(idx: np.ndarray, keep: bool) -> tuple[torch.Tensor, torch.Tensor]:
        idx = idx[(label_of[y[idx]] >= 0) == keep]
        labels = label_of[y[idx]] if keep else y[idx]
        return torch.from_numpy(x[idx].reshape(shape)), torch.from_numpy(labels)

    x_train, y_train = take(train_idx, True)
    x_val, y_val = take(val_idx, True)
    x_test, y_test = take(test_idx, True)
    x_heldout, y_heldout = take(test_idx, False)
    return DigitsData(
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        x_test=x_test,
        y_test=y_test,
        classes=kept,
        x_heldout=x_heldout,
        y_heldout=y_heldout,
        heldout_classes=tuple(sorted(set(range(10)) - set(kept))),
    )


@lru_cache(maxsize=4)
def _grey_photos(downscale: int) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    photos = []
    for rgb in load_sample_images().images:
        grey = rgb.astype(np.float64) @ _LUMA_601 / 255.0
        h = grey.shape[0] // downscale * downscale
        w = grey.shape[1] // downscale * downscale
        grey = grey[:h, :w].reshape(h // downscale, downscale, w // downscale, downscale)
        grey = grey.mean(axis=(1, 3))
        grey.flags.writeable = False
        photos.append(grey)
    return tuple(photos)


def _check_count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    return int(n)


def image_patches(
    n: int = 360,
    *,
    size: int = 8,
    seed: int = 0,
    downscale: int = 4,
    min_std: float = 0.02,
    flatten: bool = True,
) -> torch.Tensor:
    """Grey patches of natural images: an OOD set of real-world structure.

    Each photograph that scikit-learn ships (``china.jpg``, ``flower.jpg``,
    427 x 640 RGB) is turned grey with the ITU-R BT.601 luma
    ``Y = 0.299 R + 0.587 G + 0.114 B``, scaled to [0, 1], and block-averaged by
    ``downscale`` (so an 8x8 patch spans 32x32 original pixels by default and
    holds an edge or texture rather than one flat colour). Among all
    ``size x size`` windows of both images whose pixel standard deviation is at
    least ``min_std``, ``n`` are drawn uniformly without replacement.

    Parameters
    ----------
    n : int, default 360
        Number of patches (360 matches the default digits test split).
    size : int, default 8
        Patch height and width, in (downscaled) pixels.
    seed : int, default 0
        Seed of the draw; the same seed gives the same patches.
    downscale : int, default 4
        Block-averaging factor applied before cutting, in original pixels per
        patch pixel; 1 keeps full resolution.
    min_std : float, default 0.02
        Smallest within-patch standard deviation of intensity (fraction of
        full scale) a patch may have; excludes near-constant sky and blur.
    flatten : bool, default True
        ``(n, size * size)`` rows if True, ``(n, 1, size, size)`` images if False.

    Returns
    -------
    torch.Tensor
        float32 intensities in [0, 1].
    """
    n = _check_count(n)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if isinstance(downscale, bool) or not isinstance(downscale, int) or downscale < 1:
        raise ValueError(f"downscale must be a positive integer, got {downscale!r}")
    windows = []
    for photo in _grey_photos(downscale):
        if min(photo.shape) < size:
            raise ValueError(
                f"size={size} does not fit the {photo.shape} image left by downscale={downscale}"
            )
        view = np.lib.stride_tricks.sliding_window_view(photo, (size, size))
        view = view.reshape(-1, size, size)
        windows.append(view[view.std(axis=(1, 2)) >= min_std])
    pool = np.concatenate(windows)
    if n > len(pool):
        raise ValueError(
            f"only {len(pool)} patches of size {size} have std >= {min_std}; asked for {n}"
        )
    rng = np.random.default_rng(seed)
    chosen = pool[rng.choice(len(pool), size=n, replace=False)]
    shape = (n, size * size) if flatten else (n, 1, size, size)
    return torch.from_numpy(chosen.reshape(shape).astype(np.float32))


def uniform_noise(n: int = 360, *, shape=(64,), seed: int = 0) -> torch.Tensor:
    """Independent uniform pixel intensities, ``x ~ U[0, 1]`` per pixel.

    Parameters
    ----------
    n : int, default 360
        Number of examples.
    shape : tuple of int, default (64,)
        Shape of one example, e.g. ``(64,)`` or ``(1, 8, 8)``.
    seed : int, default 0
        Seed of the draw.

    Returns
    -------
    torch.Tensor
        float32, shape ``(n, *shape)``, values in [0, 1].
    """
    n = _check_count(n)
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.random((n, *tuple(shape)), dtype=np.float32))


def gaussian_noise(reference: torch.Tensor, n: int | None = None, *, seed: int = 0) -> torch.Tensor:
    """Gaussian noise with the per-pixel moments of a reference set, clipped to [0, 1].

    ``x_j = clip(mu_j + s_j * z_j, 0, 1)``, ``z_j ~ N(0, 1)``, where ``mu_j`` and
    ``s_j`` are the mean and standard deviation of pixel ``j`` over
    ``reference``. The noise matches the data's first two moments per pixel but
    has none of its spatial structure: a harder sanity check than uniform noise.

    Parameters
    ----------
    reference : torch.Tensor
        Examples ``(m, ...)`` whose moments are matched, usually the training
        inputs; intensities in [0, 1].
    n : int, optional
        Number of examples; default ``m``.
    seed : int, default 0
        Seed of the draw.

    Returns
    -------
    torch.Tensor
        float32, shape ``(n, *reference.shape[1:])``, values in [0, 1].
    """
    ref = torch.as_tensor(reference).detach().cpu().double().numpy()
    if ref.ndim < 2 or len(ref) == 0:
        raise ValueError(
            f"reference must hold at least one example of shape (m, ...), got {ref.shape}"
        )
    n = len(ref) if n is None else _check_count(n)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, *ref.shape[1:]))
    x = np.clip(ref.mean(axis=0) + ref.std(axis=0) * z, 0.0, 1.0)
    return torch.from_numpy(x.astype(np.float32))


_OOD_SET_NAMES = ("patches", "noise", "uniform", "inverted", "heldout")


def available_ood_sets() -> tuple[str, ...]:
    """Names :func:`ood_sets` accepts."""
    return _OOD_SET_NAMES


def ood_sets(
    data: DigitsData | None = None,
    *,
    names=None,
    n: int | None = None,
    seed: int = 0,
) -> OrderedDict[str, torch.Tensor]:
    """Out-of-distribution sets for a digits split, by name.

    Sets (each float32 in [0, 1], laid out like ``data.x_test``):

    - ``"patches"``: grey natural-image patches (:func:`image_patches`);
    - ``"noise"``: Gaussian noise with the per-pixel moments of ``data.x_train``,
      clipped (:func:`gaussian_noise`);
    - ``"uniform"``: uniform noise (:func:`uniform_noise`);
    - ``"inverted"``: the test digits with intensities inverted, ``1 - x``;
    - ``"heldout"``: test images of the held-out digits (``data.x_heldout``).

    Parameters
    ----------
    data : DigitsData, optional
        The in-distribution split; default :func:`load_digits_split` ``()``.
    names : sequence of str, optional
        Sets to build, in order. Default ``("patches", "noise")``, followed by
        ``"heldout"`` when ``data`` holds out classes.
    n : int, optional
        Size of each generated set; default ``len(data.x_test)`` (360), so OOD
        and in-distribution test sets weigh the same. ``"inverted"`` and
        ``"heldout"`` keep their natural sizes.
    seed : int, default 0
        Seed of the generated sets.

    Returns
    -------
    OrderedDict of str to torch.Tensor
        Name to inputs, in the order of ``names``.
    """
    data = load_digits_split() if data is None else data
    if names is None:
        names = ("patches", "noise") + (("heldout",) if len(data.x_heldout) else ())
    elif isinstance(names, str):
        names = (names,)
    unknown = [name for name in names if name not in _OOD_SET_NAMES]
    if unknown:
        raise ValueError(f"unknown OOD set(s) {unknown}; available: {', '.join(_OOD_SET_NAMES)}")
    n = len(data.x_test) if n is None else _check_count(n)
    example_shape = tuple(data.x_test.shape[1:])
    flatten = len(example_shape) == 1

    sets: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name in names:
        if name == "patches":
            sets[name] = image_patches(n, seed=seed, flatten=flatten)
        elif name == "noise":
            sets[name] = gaussian_noise(data.x_train, n, seed=seed)
        elif name == "uniform":
            sets[name] = uniform_noise(n, shape=example_shape, seed=seed)
        elif name == "inverted":
            sets[name] = 1.0 - data.x_test
        elif name == "heldout":
            if len(data.x_heldout) == 0:
                raise ValueError(
                    "the 'heldout' OOD set needs a split made with classes=...; "
                    "this one keeps all ten digits"
                )
            sets[name] = data.x_heldout
    return sets


def _check_file(path) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    return path


def load_npz(path, *, x_key: str = "x", y_key: str | None = "y"):
    """Load inputs and labels from a NumPy ``.npz`` archive.

    Parameters
    ----------
    path : str or os.PathLike
        The archive, as written by ``numpy.savez`` or ``numpy.savez_compressed``.
    x_key : str, default "x"
        Name of the input array, shape ``(n, ...)``.
    y_key : str or None, default "y"
        Name of the label array, shape ``(n,)`` with integer values; None for
        an unlabelled set (an OOD set).

    Returns
    -------
    x : torch.Tensor
        Inputs as float32, values unchanged (divide 8-bit images by 255 to get
        intensities in [0, 1]).
    y : torch.Tensor or None
        Labels as int64, or None when ``y_key`` is None.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The file is not an ``.npz`` archive, or ``x`` and ``y`` disagree in
        length, or ``y`` is not a vector of integers.
    KeyError
        A key is missing; the message lists the keys present.
    """
    path = _check_file(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ValueError(f"{path!r} is not a readable .npz archive: {err}") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path!r} is a single .npy array, not an .npz archive of named arrays")
    with archive:
        keys = [key for key in (x_key, y_key) if key is not None]
        missing = [key for key in keys if key not in archive.files]
        if missing:
            raise KeyError(
                f"{path!r} has no array named {missing[0]!r}; it holds: {', '.join(archive.files)}"
            )
        x = archive[x_key]
        y = archive[y_key] if y_key is not None else None

    if x.ndim < 1:
        raise ValueError(f"{path!r}: {x_key!r} must have shape (n, ...), got a scalar")
    x_tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if y is None:
        return x_tensor, None
    if y.ndim != 1:
        raise ValueError(f"{path!r}: {y_key!r} must have shape (n,), got {y.shape}")
    if len(y) != len(x):
        raise ValueError(
            f"{path!r}: {x_key!r} has {len(x)} examples but {y_key!r} has {len(y)} labels"
        )
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
        if not (np.issubdtype(y.dtype, np.floating) and np.array_equal(y, np.round(y))):
            raise ValueError(f"{path!r}: {y_key!r} must hold integer labels, got dtype {y.dtype}")
    return x_tensor, torch.from_numpy(y.astype(np.int64))


# IDX type codes (third byte of the magic number) -> big-endian element type.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def load_idx(path) -> torch.Tensor:
    """Load an array stored in the IDX binary format (MNIST and its relatives).

    The format: a 4-byte magic number ``0x00 0x00 <type> <ndim>``, then ``ndim``
    big-endian uint32 dimension sizes, then the elements, big-endian, row-major.
    Type codes: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
    0x0E float64. Gzip-compressed files (``*.gz``, as MNIST is distributed) are
    recognised by their content and decompressed.

    Parameters
    ----------
    path : str or os.PathLike
        The file, e.g. ``train-images-idx3-ubyte.gz``.

    Returns
    -------
    torch.Tensor
        The array with its stored shape and element type (uint8 for MNIST:
        divide images by 255 for intensities in [0, 1]; cast labels to int64).

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        The magic number is not that of an IDX file, the header is cut short,
        or the data size disagrees with the dimensions in the header.
    """
    path = _check_file(path)
    with open(path, "rb") as handle:
        raw = handle.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(
                f"{path!r} looks gzip-compressed but cannot be decompressed: {err}"
            ) from err

    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path!r} is not an IDX file: wrong magic number {raw[:4].hex()!r} "
            f"(expected 0000, a type code in {{08, 09, 0b, 0c, 0d, 0e}}, and the number of dims)"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    if ndim == 0:
        raise ValueError(f"{path!r}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(
            f"{path!r}: IDX header is cut short ({len(raw)} bytes, {header_len} needed "
            f"for {ndim} dimensions)"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header_len
    if found != expected:
        raise ValueError(
            f"{path!r}: IDX data size mismatch: shape {shape} of {dtype.name} needs "
            f"{expected} bytes, found {found}"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("=")))
