"""NumPy ``.npz`` archives: inputs and labels by name.

:func:`load_npz` reads one ``(x, y)`` pair as float tensors. :func:`read_npz`
is what :func:`bayesflat.data.load` uses: it keeps 8-bit images as uint8, lays
images out channels first, and reads an optional test split and class names
stored in the same archive.
"""

from __future__ import annotations

import numpy as np
import torch

from bayesflat.data._common import LabelledImages, check_file, check_labels, default_names

__all__ = ["load_npz", "read_npz"]


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
    path = check_file(path)
    with _open(path) as archive:
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


def _open(path: str):
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:
        raise ValueError(f"{path!r} is not a readable .npz archive: {err}") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path!r} is a single .npy array, not an .npz archive of named arrays")
    return archive


def _channels_first(x: np.ndarray, path: str, key: str) -> np.ndarray:
    if x.ndim == 2:  # flat feature rows
        return x
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return x
    if x.ndim == 4 and x.shape[3] in (1, 3):
        return x.transpose(0, 3, 1, 2)
    raise ValueError(
        f"{path!r}: {key!r} must be rows (n, d), grey images (n, H, W) or images with 1 or 3 "
        f"channels, (n, C, H, W) or (n, H, W, C); got shape {x.shape}"
    )


def _inputs(x: np.ndarray, path: str, key: str) -> torch.Tensor:
    if x.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(_channels_first(x, path, key)))
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise ValueError(f"{path!r}: {key!r} must hold numbers, got dtype {x.dtype}")
    return torch.from_numpy(np.ascontiguousarray(_channels_first(x, path, key), dtype=np.float32))


def _labels(archive, key: str, n: int, path: str) -> np.ndarray:
    y = archive[key]
    if y.shape != (n,):
        raise ValueError(
            f"{path!r}: {key!r} must have shape ({n},), one label per input; got {y.shape}"
        )
    integral = np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and np.array_equal(y, np.round(y))
    )
    if not integral:
        raise ValueError(f"{path!r}: {key!r} must hold integer labels, got dtype {y.dtype}")
    return y.astype(np.int64)


def read_npz(path) -> tuple[LabelledImages, LabelledImages | None]:
    """Read a labelled image set, and its test split if stored, from an ``.npz`` archive.

    Arrays: ``x`` (inputs) and ``y`` (integer labels), optionally ``x_test`` and
    ``y_test`` (a test split kept apart) and ``classes`` (a string array of
    class names in label order). Inputs may be rows ``(n, d)``, grey images
    ``(n, H, W)``, or images ``(n, C, H, W)`` or ``(n, H, W, C)`` with ``C`` 1
    or 3; images come back channels first. uint8 inputs stay uint8 (pixel
    values 0..255); other numbers become float32, values unchanged.

    Parameters
    ----------
    path : str or os.PathLike
        The archive, as written by ``numpy.savez`` or ``numpy.savez_compressed``.

    Returns
    -------
    train : LabelledImages
        ``x`` and ``y``.
    test : LabelledImages or None
        ``x_test`` and ``y_test``, or None when the archive has none.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Not an ``.npz`` archive, ``x`` or ``y`` missing, only one of ``x_test``
        and ``y_test`` present, shapes that disagree, or labels out of range.
    """
    path = check_file(path)
    with _open(path) as archive:
        files = set(archive.files)
        missing = [key for key in ("x", "y") if key not in files]
        if missing:
            raise ValueError(
                f"{path!r} has no array named {missing[0]!r}; a labelled set needs 'x' and 'y' "
                f"(optionally 'x_test', 'y_test', 'classes'); it holds: {', '.join(archive.files)}"
            )
        if ("x_test" in files) != ("y_test" in files):
            raise ValueError(f"{path!r} must hold both 'x_test' and 'y_test', or neither")
        parts = [("x", "y")] + ([("x_test", "y_test")] if "x_test" in files else [])
        read = []
        for x_key, y_key in parts:
            x = _inputs(archive[x_key], path, x_key)
            read.append((x, _labels(archive, y_key, len(x), path)))
        names = None
        if "classes" in files:
            stored = archive["classes"]
            if stored.ndim != 1 or stored.dtype.kind not in "US":
                raise ValueError(f"{path!r}: 'classes' must be a 1-d array of strings")
            names = tuple(s.decode() if isinstance(s, bytes) else str(s) for s in stored.tolist())
    if names is None:
        names = default_names(int(max(y.max(initial=0) for _, y in read)) + 1)
    if len(read) == 2 and read[0][0].shape[1:] != read[1][0].shape[1:]:
        raise ValueError(
            f"{path!r}: 'x' examples have shape {tuple(read[0][0].shape[1:])} but 'x_test' "
            f"examples {tuple(read[1][0].shape[1:])}"
        )
    sets = [
        LabelledImages(x, torch.from_numpy(check_labels(y, len(names), path, "label")), names)
        for x, y in read
    ]
    return sets[0], (sets[1] if len(sets) == 2 else None)
