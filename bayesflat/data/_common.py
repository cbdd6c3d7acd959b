"""Pieces every format module shares: the reader result, path and label checks."""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["LabelledImages"]


class LabelledImages(NamedTuple):
    """Images and labels as read from one file or folder.

    Attributes
    ----------
    x : torch.Tensor
        Images ``(n, C, H, W)``, channels first: uint8 pixel values 0..255 for
        image formats, or the stored float values (npz).
    y : torch.Tensor
        int64 labels in ``0 .. len(classes) - 1``, shape ``(n,)``.
    classes : tuple of str
        Class name of each label; the label's decimal string when the format
        stores no names.
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: tuple[str, ...]


def check_file(path: object) -> str:
    """Return ``path`` as a str; FileNotFoundError if it is not an existing file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path!r}")
    return path


def check_dir(path: object) -> str:
    """Return ``path`` as a str; FileNotFoundError if it is not an existing folder."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no such folder: {path!r}")
    return path


def check_labels(labels: np.ndarray, num_classes: int, path: str, what: str) -> np.ndarray:
    """Return ``labels`` as int64 after checking every one lies in ``0 .. num_classes - 1``."""
    labels = np.asarray(labels).astype(np.int64, copy=False)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{path!r}: {what} {int(labels[i])} of example {i} is out of range; "
            f"expected 0..{num_classes - 1} ({bad.size} such labels)"
        )
    return labels


def default_names(num_classes: int) -> tuple[str, ...]:
    """Class names for a format that stores none: the labels as decimal strings."""
    return tuple(str(k) for k in range(num_classes))


def uint8_images(x: object, argname: str, channels: int | None = None) -> np.ndarray:
    """Writers' input check: ``x`` as a uint8 array ``(n, C, H, W)``."""
    array = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if array.dtype != np.uint8:
        raise ValueError(f"{argname} must hold uint8 pixel values 0..255, got dtype {array.dtype}")
    if array.ndim != 4 or (channels is not None and array.shape[1] != channels):
        c = "C" if channels is None else str(channels)
        raise ValueError(f"{argname} must have shape (n, {c}, H, W), got {array.shape}")
    return np.ascontiguousarray(array)


def int_labels(y: object, n: int, argname: str, num_classes: int) -> np.ndarray:
    """Writers' input check: ``y`` as int64 ``(n,)`` with values in ``0 .. num_classes - 1``."""
    array = y.numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if array.shape != (n,) or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{argname} must be {n} integer labels, shape ({n},), got {array.dtype} {array.shape}"
        )
    if n and (array.min() < 0 or array.max() >= num_classes):
        raise ValueError(
            f"{argname} must lie in 0..{num_classes - 1}, got {array.min()}..{array.max()}"
        )
    return array.astype(np.int64)
