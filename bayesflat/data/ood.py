"""Out-of-distribution sets: generated (natural-image patches, noise) or read from files.

Generated sets need nothing downloaded: patches are cut from the two photographs
scikit-learn ships (``china.jpg``, ``flower.jpg``), noise is drawn. Every
random choice comes from a ``numpy.random.Generator`` seeded by the ``seed``
argument, so results never depend on (or disturb) PyTorch's global random
state. :func:`load_ood` reads an OOD set from a file or folder in any format
:func:`bayesflat.data.load` reads (e.g. SVHN's test set for a CIFAR model).
Sets come back as model inputs of the in-distribution split: standardised with
its training statistics (:meth:`DataSplit.inputs`), which for digits is the
identity, leaving intensities in [0, 1].
"""

from __future__ import annotations

from collections import OrderedDict
from functools import lru_cache

import numpy as np
import torch

from bayesflat._checks import check_int
from bayesflat.data.digits import load_digits_split
from bayesflat.data.packaged import sample_photographs
from bayesflat.data.split import DataSplit

__all__ = [
    "available_ood_sets",
    "gaussian_noise",
    "image_patches",
    "load_ood",
    "ood_sets",
    "uniform_noise",
]

# ITU-R BT.601 luma weights for R, G, B.
_LUMA_601 = np.array([0.299, 0.587, 0.114])
# Examples per chunk when accumulating pixel moments of a large reference set.
_CHUNK = 4096


def _block_mean(image: np.ndarray, downscale: int) -> np.ndarray:
    """Average of each ``downscale x downscale`` block of a 2-d image (ragged edges dropped)."""
    h = image.shape[0] // downscale * downscale
    w = image.shape[1] // downscale * downscale
    blocks = image[:h, :w].reshape(h // downscale, downscale, w // downscale, downscale)
    return blocks.mean(axis=(1, 3))


@lru_cache(maxsize=4)
def _photos(downscale: int, channels: int) -> tuple[np.ndarray, ...]:
    """The sample photographs as intensities, ``(H, W)`` grey or ``(H, W, 3)`` RGB."""
    photos = []
    for rgb in sample_photographs():
        if channels == 1:
            photo = _block_mean(rgb.astype(np.float64) @ _LUMA_601 / 255.0, downscale)
        else:
            planes = rgb.astype(np.float64).transpose(2, 0, 1) / 255.0
            photo = np.stack([_block_mean(plane, downscale) for plane in planes], axis=-1)
        photo.flags.writeable = False
        photos.append(photo)
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
    channels: int = 1,
) -> torch.Tensor:
    """Patches of natural images: an OOD set of real-world structure.

    Each photograph that scikit-learn ships (``china.jpg``, ``flower.jpg``,
    427 x 640 RGB) is scaled to [0, 1], turned grey with the ITU-R BT.601 luma
    ``Y = 0.299 R + 0.587 G + 0.114 B`` (``channels=1``) or kept in colour
    (``channels=3``), and block-averaged by ``downscale`` (so an 8x8 patch
    spans 32x32 original pixels by default and holds an edge or texture rather
    than one flat colour). Among all ``size x size`` windows of both images
    whose intensity standard deviation (over the window's pixels and
    channels) is at least ``min_std``, ``n`` are drawn uniformly without
    replacement.

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
        ``(n, channels * size * size)`` rows if True, ``(n, channels, size, size)``
        images if False.
    channels : {1, 3}, default 1
        Grey or RGB patches.

    Returns
    -------
    torch.Tensor
        float32 intensities in [0, 1].
    """
    n = _check_count(n)
    size = check_int(size, "size", 1)
    downscale = check_int(downscale, "downscale", 1)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    photos = _photos(downscale, channels)
    candidates = []  # (photo, row, column) of every window spread enough, in scan order
    for k, photo in enumerate(photos):
        if min(photo.shape[:2]) < size:
            raise ValueError(
                f"size={size} does not fit the {photo.shape[:2]} image left by "
                f"downscale={downscale}"
            )
        if channels == 1:
            view = np.lib.stride_tricks.sliding_window_view(photo, (size, size))
            spread = view.reshape(-1, size, size).std(axis=(1, 2))
        else:
            spread = _window_std(photo, size).reshape(-1)
        width = photo.shape[1] - size + 1
        where = np.flatnonzero(spread >= min_std)
        candidates.append(np.stack([np.full_like(where, k), where // width, where % width], 1))
    pool = np.concatenate(candidates)
    if n > len(pool):
        raise ValueError(
            f"only {len(pool)} patches of size {size} have std >= {min_std}; asked for {n}"
        )
    rng = np.random.default_rng(seed)
    chosen = pool[rng.choice(len(pool), size=n, replace=False)]
    patches = np.stack([photos[k][i : i + size, j : j + size] for k, i, j in chosen])
    if channels == 3:
        patches = patches.transpose(0, 3, 1, 2)
    shape = (n, channels * size * size) if flatten else (n, channels, size, size)
    return torch.from_numpy(patches.reshape(shape).astype(np.float32))


def _window_std(photo: np.ndarray, size: int) -> np.ndarray:
    """Standard deviation over the pixels and channels of every ``size x size`` window.

    From box sums of ``v`` and ``v^2`` on summed-area tables:
    ``std = sqrt(E[v^2] - E[v]^2)`` per window, shape ``(H - size + 1, W - size + 1)``.
    """

    def box(a: np.ndarray) -> np.ndarray:
        table = np.pad(a.cumsum(axis=0).cumsum(axis=1), ((1, 0), (1, 0)))
        return (
            table[size:, size:]
            - table[:-size, size:]
            - table[size:, :-size]
            + table[:-size, :-size]
        )

    count = size * size * photo.shape[2]
    mean = box(photo.sum(axis=2)) / count
    var = box((photo * photo).sum(axis=2)) / count - mean * mean
    return np.sqrt(np.maximum(var, 0.0))


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


def _pixel_moments(reference: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean and standard deviation (``ddof = 0``) of intensities, in float64."""
    scale = 255.0 if reference.dtype == torch.uint8 else 1.0
    if len(reference) <= _CHUNK:
        ref = reference.double().numpy() / scale
        return ref.mean(axis=0), ref.std(axis=0)
    # Two passes over chunks: the float64 copy of a 50,000-image set would take 1.2 GB.
    total = np.zeros(reference.shape[1:])
    for start in range(0, len(reference), _CHUNK):
        total += reference[start : start + _CHUNK].double().numpy().sum(axis=0) / scale
    mean = total / len(reference)
    squares = np.zeros_like(mean)
    for start in range(0, len(reference), _CHUNK):
        deviation = reference[start : start + _CHUNK].double().numpy() / scale - mean
        squares += (deviation * deviation).sum(axis=0)
    return mean, np.sqrt(squares / len(reference))


def gaussian_noise(reference: torch.Tensor, n: int | None = None, *, seed: int = 0) -> torch.Tensor:
    """Gaussian noise with the per-pixel moments of a reference set, clipped to [0, 1].

    ``x_j = clip(mu_j + s_j * z_j, 0, 1)``, ``z_j ~ N(0, 1)``, where ``mu_j`` and
    ``s_j`` are the mean and standard deviation of the intensity of pixel ``j``
    over ``reference``. The noise matches the data's first two moments per
    pixel but has none of its spatial structure: a harder sanity check than
    uniform noise.

    Parameters
    ----------
    reference : torch.Tensor
        Examples ``(m, ...)`` whose moments are matched, usually the training
        images: float intensities in [0, 1], or uint8 pixel values (divided by 255).
    n : int, optional
        Number of examples; default ``m``.
    seed : int, default 0
        Seed of the draw.

    Returns
    -------
    torch.Tensor
        float32 intensities, shape ``(n, *reference.shape[1:])``, values in [0, 1].
    """
    ref = torch.as_tensor(reference).detach().cpu()
    if ref.dim() < 2 or len(ref) == 0:
        raise ValueError(
            f"reference must hold at least one example of shape (m, ...), got {tuple(ref.shape)}"
        )
    n = len(ref) if n is None else _check_count(n)
    mean, std = _pixel_moments(ref)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, *ref.shape[1:]))
    x = np.clip(mean + std * z, 0.0, 1.0)
    return torch.from_numpy(x.astype(np.float32))


_OOD_SET_NAMES = ("patches", "noise", "uniform", "inverted", "heldout")


def available_ood_sets() -> tuple[str, ...]:
    """Names :func:`ood_sets` accepts."""
    return _OOD_SET_NAMES


def ood_sets(
    data: DataSplit | None = None,
    *,
    names=None,
    n: int | None = None,
    seed: int = 0,
) -> OrderedDict[str, torch.Tensor]:
    """Generated out-of-distribution sets for a split, by name, as model inputs.

    Sets (each made in intensities laid out like ``data.x_test``, then passed
    through ``data.inputs``, the identity for digits):

    - ``"patches"``: natural-image patches of the images' size, grey or RGB
      as the data (:func:`image_patches`; needs square images);
    - ``"noise"``: Gaussian noise with the per-pixel moments of ``data.x_train``,
      clipped (:func:`gaussian_noise`);
    - ``"uniform"``: uniform noise (:func:`uniform_noise`);
    - ``"inverted"``: the test images with intensities inverted, ``1 - v``;
    - ``"heldout"``: test images of the held-out digits (``data.x_heldout``).

    Parameters
    ----------
    data : DataSplit, optional
        The in-distribution split; default :func:`load_digits_split` ``()``.
    names : sequence of str, optional
        Sets to build, in order. Default ``("patches", "noise")``, followed by
        ``"heldout"`` when ``data`` holds out classes.
    n : int, optional
        Size of each generated set; default ``len(data.x_test)`` (360 for
        digits), so OOD and in-distribution test sets weigh the same.
        ``"inverted"`` and ``"heldout"`` keep their natural sizes.
    seed : int, default 0
        Seed of the generated sets.

    Returns
    -------
    OrderedDict of str to torch.Tensor
        Name to inputs, in the order of ``names``.
    """
    from bayesflat.data.split import intensities

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
            height, width = (tuple(data.image_shape) + (None, None))[:2]
            if height is None or height != width:
                raise ValueError(
                    f"the 'patches' OOD set needs square images; this split has image_shape "
                    f"{tuple(data.image_shape)}"
                )
            x = image_patches(n, size=height, seed=seed, flatten=flatten, channels=data.channels)
            sets[name] = x.reshape(n, *example_shape)
        elif name == "noise":
            sets[name] = gaussian_noise(data.x_train, n, seed=seed)
        elif name == "uniform":
            sets[name] = uniform_noise(n, shape=example_shape, seed=seed)
        elif name == "inverted":
            sets[name] = 1.0 - intensities(data.x_test)
        elif name == "heldout":
            if len(data.x_heldout) == 0:
                raise ValueError(
                    "the 'heldout' OOD set needs a digits split made with classes=...; "
                    "this one keeps every class"
                )
            sets[name] = data.x_heldout
    return OrderedDict((name, data.inputs(x)) for name, x in sets.items())


def load_ood(
    path,
    data: DataSplit,
    format: str | None = None,
    *,
    n: int | None = None,
    seed: int = 0,
    label: str = "fine",
    mode: str = "auto",
    size: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """Read an out-of-distribution set from a file or folder, as inputs of ``data``'s model.

    The images are read as :func:`bayesflat.data.load` reads them (same
    formats, same detection); of a data set with its own test split (an
    extracted CIFAR archive, a folder with SVHN's ``test_32x32.mat``, an image
    folder with ``train/`` and ``test/``) the test split is taken, else every
    image. A folder of images without class subfolders is read too. Labels are
    dropped. The images are then standardised with ``data``'s *training*
    statistics (:meth:`DataSplit.inputs`), as the model sees them.

    Parameters
    ----------
    path : str or os.PathLike
        File or folder, e.g. SVHN's ``test_32x32.mat`` for a CIFAR-10 model.
    data : DataSplit
        The in-distribution split; the OOD images must have its image layout
        ``x_train.shape[1:]`` (channels, height, width).
    format : str, optional
        As for :func:`bayesflat.data.load`; default detected.
    n : int, optional
        Keep ``n`` images drawn uniformly without replacement (in file order);
        default all.
    seed : int, default 0
        Seed of that draw.
    label, mode, size
        As for :func:`bayesflat.data.load`; ``mode`` and ``size`` let an image
        folder match ``data``'s channels and size.

    Returns
    -------
    torch.Tensor
        float32 model inputs, laid out like ``data.x_test``.

    Raises
    ------
    FileNotFoundError
        The path does not exist.
    ValueError
        Unknown format, unreadable data, or images laid out unlike ``data``'s.
    """
    from bayesflat.data.load import read_path

    _, pool, test, _ = read_path(path, format, label=label, mode=mode, size=size, unlabelled=True)
    images = (test if test is not None else pool).x
    expected = tuple(data.x_train.shape[1:])
    if tuple(images.shape[1:]) != expected:
        raise ValueError(
            f"OOD images from {str(path)!r} have shape {tuple(images.shape[1:])} but the model "
            f"takes {expected} (channels, height, width); for an image folder pass "
            "mode='RGB' or 'L' and size=(height, width) to match"
        )
    if n is not None:
        n = _check_count(n)
        if n > len(images):
            raise ValueError(f"n={n} exceeds the {len(images)} images in {str(path)!r}")
        keep = np.sort(np.random.default_rng(seed).choice(len(images), size=n, replace=False))
        images = images[torch.from_numpy(keep)]
    return data.inputs(images)
