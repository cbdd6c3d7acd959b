"""IDX binary arrays (MNIST, Fashion-MNIST, EMNIST): reader, writer, folder layout.

The format: a 4-byte magic number ``0x00 0x00 <type> <ndim>``, then ``ndim``
big-endian uint32 dimension sizes, then the elements, big-endian, row-major.
Type codes: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32,
0x0E float64. A data set is four files: ``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte``, each possibly gzip-compressed (``.gz``).
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from bayesflat import _io
from bayesflat.data._common import LabelledImages, check_file, check_labels, default_names

__all__ = ["load_idx", "write_idx"]

_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def has_idx_magic(head: bytes) -> bool:
    """True when ``head``, a file's first bytes, starts with an IDX magic number."""
    return len(head) >= 4 and head[:2] == b"\x00\x00" and head[2] in _IDX_DTYPES


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
    path = check_file(path)
    with open(path, "rb") as handle:
        raw = handle.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(
                f"{path!r} looks gzip-compressed but cannot be decompressed: {err}"
            ) from err

    if not has_idx_magic(raw):
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


def write_idx(path, array, *, compress: bool = False) -> Path:
    """Write an array in the IDX format (see :func:`load_idx`), optionally gzip-compressed.

    Parameters
    ----------
    path : str or os.PathLike
        File to write, e.g. ``train-images-idx3-ubyte`` (add ``.gz`` when compressing).
    array : torch.Tensor or numpy.ndarray
        At least one dimension, of type uint8, int8, int16, int32, float32 or
        float64; stored big-endian.
    compress : bool, default False
        Gzip the file, as MNIST is distributed.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    values = array.numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    codes = {dtype.newbyteorder("="): code for code, dtype in _IDX_DTYPES.items()}
    code = codes.get(values.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(
            f"array dtype {values.dtype} has no IDX type code; use uint8, int8, int16, int32, "
            "float32 or float64"
        )
    if values.ndim < 1 or values.ndim > 255:
        raise ValueError(f"array must have 1 to 255 dimensions, got {values.ndim}")
    header = bytes([0, 0, code, values.ndim]) + np.array(values.shape, dtype=">u4").tobytes()
    raw = header + values.astype(_IDX_DTYPES[code], copy=False).tobytes()
    path = Path(path)
    _io.write_bytes(path, gzip.compress(raw) if compress else raw)
    return path


def _find(folder: str, names: list[str], split: tuple[str, ...], kind: str) -> str | None:
    found = [n for n in names if kind in n.lower() and any(s in n.lower() for s in split)]
    if len(found) > 1:
        raise ValueError(f"{folder!r} holds several {split[0]} {kind} files: {sorted(found)}")
    return os.path.join(folder, found[0]) if found else None


def idx_layout(folder: str) -> dict[str, str | None] | None:
    """Paths of the train/test image/label IDX files in ``folder``, or None when it has none."""
    names = [
        n for n in os.listdir(folder) if "-ubyte" in n and os.path.isfile(os.path.join(folder, n))
    ]
    if not names:
        return None
    return {
        f"{split}_{what}": _find(folder, names, tags, f"{what}-idx")
        for split, tags in (("train", ("train",)), ("test", ("t10k", "test")))
        for what in ("images", "labels")
    }


def _labelled(images_path: str, labels_path: str | None) -> tuple[torch.Tensor, np.ndarray]:
    if labels_path is None:
        raise ValueError(f"{images_path!r} has no matching *-labels-idx1-ubyte file next to it")
    images, labels = load_idx(images_path), load_idx(labels_path).numpy()
    if images.dtype != torch.uint8 or images.dim() not in (3, 4):
        raise ValueError(
            f"{images_path!r}: IDX images must be uint8 (n, H, W) or (n, H, W, C), got "
            f"{images.dtype} {tuple(images.shape)}"
        )
    if labels.shape != (len(images),):
        raise ValueError(
            f"{labels_path!r} holds labels of shape {labels.shape}; {images_path!r} has "
            f"{len(images)} images"
        )
    x = images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2)
    return x.contiguous(), labels


def read_idx_folder(folder: str) -> tuple[LabelledImages, LabelledImages | None]:
    """Read an MNIST-style folder of IDX files into its training pool and test split.

    Images become uint8 ``(n, 1, H, W)``; class names are the label numbers
    ``0 .. max label``.
    """
    layout = idx_layout(folder) or {}
    if layout.get("train_images") is None:
        raise ValueError(
            f"{folder!r} holds no training images in IDX format; expected "
            "train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz] "
            "(and t10k-images/t10k-labels for a test split)"
        )
    parts = [_labelled(layout["train_images"], layout["train_labels"])]
    if layout["test_images"] is not None:
        parts.append(_labelled(layout["test_images"], layout["test_labels"]))
    names = default_names(int(max(y.max(initial=0) for _, y in parts)) + 1)
    sets = [
        LabelledImages(x, torch.from_numpy(check_labels(y, len(names), folder, "label")), names)
        for x, y in parts
    ]
    return sets[0], (sets[1] if len(sets) == 2 else None)
