"""SVHN cropped digits (``train_32x32.mat``, ``test_32x32.mat``): reader and writer.

Each file is a MATLAB (level 5) file with two variables: ``X``, uint8 of shape
``(32, 32, 3, n)`` (row, column, RGB channel, image), and ``y``, shape
``(n, 1)``, the digit with the label 10 standing for the digit 0 (labels 1..10,
MATLAB style). The reader returns channels-first images and labels 0..9,
mapping 10 to 0.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from bayesflat.data._common import (
    LabelledImages,
    check_file,
    default_names,
    int_labels,
    uint8_images,
)

__all__ = ["read_svhn_mat", "write_svhn_mat"]

TRAIN_FILE, TEST_FILE = "train_32x32.mat", "test_32x32.mat"


def read_svhn_mat(path) -> LabelledImages:
    """Read an SVHN cropped-digits ``.mat`` file.

    Parameters
    ----------
    path : str or os.PathLike
        E.g. ``train_32x32.mat``, ``test_32x32.mat`` or ``extra_32x32.mat``.

    Returns
    -------
    LabelledImages
        uint8 images ``(n, 3, 32, 32)`` (``X`` transposed from ``(H, W, C, n)``),
        int64 labels 0..9 (the file's 10 becomes 0), class names ``"0"`` .. ``"9"``.

    Raises
    ------
    FileNotFoundError
        The file does not exist.
    ValueError
        Not a MATLAB level-5 file (v7.3 files are HDF5 and need resaving with
        ``-v7``), ``X`` or ``y`` missing or misshapen, or a label outside 0..10.
    """
    from scipy.io import loadmat

    path = check_file(path)
    try:
        content = loadmat(path, variable_names=("X", "y"))
    except NotImplementedError as err:  # scipy's answer to a v7.3 (HDF5) file
        raise ValueError(
            f"{path!r} is a MATLAB v7.3 (HDF5) file; SVHN's files are level 5: "
            "resave it with save(..., '-v7') or use the original download"
        ) from err
    except Exception as err:
        raise ValueError(f"{path!r} is not a readable MATLAB .mat file: {err}") from err
    missing = [key for key in ("X", "y") if key not in content]
    if missing:
        raise ValueError(
            f"{path!r} has no variable {missing[0]!r}; an SVHN file holds X (32, 32, 3, n) "
            "uint8 and y (n, 1)"
        )
    x, y = content["X"], content["y"]
    if x.ndim != 4 or x.shape[2] != 3 or x.dtype != np.uint8:
        raise ValueError(
            f"{path!r}: X must be uint8 of shape (H, W, 3, n), got {x.dtype} {x.shape}"
        )
    n = x.shape[3]
    if y.size != n:
        raise ValueError(f"{path!r}: X holds {n} images but y holds {y.size} labels")
    labels = y.reshape(n).astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels > 10))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{path!r}: label {labels[i]} of example {i} is out of range; "
            "expected 1..10 (10 for the digit 0)"
        )
    labels[labels == 10] = 0
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return LabelledImages(torch.from_numpy(images), torch.from_numpy(labels), default_names(10))


def write_svhn_mat(path, x, y) -> Path:
    """Write images as an SVHN cropped-digits ``.mat`` file (MATLAB level 5).

    Stores ``X = x`` transposed to ``(H, W, 3, n)`` uint8 and ``y`` as uint8
    ``(n, 1)`` with the digit 0 written as 10, as in the distributed files.

    Parameters
    ----------
    path : str or os.PathLike
        File to write, e.g. ``test_32x32.mat``.
    x : torch.Tensor or numpy.ndarray
        uint8 images ``(n, 3, H, W)``.
    y : array-like of int
        Digits 0..9, shape ``(n,)``.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    from scipy.io import savemat

    images = uint8_images(x, "x", channels=3)
    digits = int_labels(y, len(images), "y", 10)
    stored = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(-1, 1)
    path = Path(path)
    savemat(path, {"X": images.transpose(2, 3, 1, 0), "y": stored}, format="5")
    return path


def svhn_layout(folder: str) -> tuple[str, str | None] | None:
    """``(train file, test file or None)`` of a folder holding SVHN files, or None."""
    train, test = os.path.join(folder, TRAIN_FILE), os.path.join(folder, TEST_FILE)
    if os.path.isfile(train):
        return train, (test if os.path.isfile(test) else None)
    if os.path.isfile(test):
        return test, None
    return None
