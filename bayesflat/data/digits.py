"""The embedded digits: scikit-learn's copy of the UCI optical digits, as a fixed split.

1797 greyscale 8x8 images, 10 classes, nothing downloaded. Images are float32
intensities in [0, 1] (pixel counts 0..16 divided by 16), used as model inputs
as they are (the split's ``mean`` is 0 and ``std`` 1); labels int64. Flat
tensors are ``(n, 64)``, image tensors ``(n, 1, 8, 8)`` (channels first, as
``torch.nn.Conv2d`` expects). Every random choice comes from the ``seed``
argument, so results never depend on (or disturb) PyTorch's global random state.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from bayesflat.data.packaged import digits_table
from bayesflat.data.split import DataSplit, check_fraction, stratified_split

__all__ = ["load_digits_split"]

DIGITS_IMAGE_SHAPE = (8, 8)
# Digits pixels are integer counts 0..16 (set pixels in a 4x4 block of the 32x32 scan).
_DIGITS_MAX = 16.0


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    pixels, labels = digits_table()
    x = (pixels / _DIGITS_MAX).astype(np.float32)
    y = labels.astype(np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


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
) -> DataSplit:
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
    DataSplit
        The split as tensors, with the class mapping; ``mean`` 0 and ``std`` 1
        (intensities are the model inputs).

    Examples
    --------
    >>> data = load_digits_split()
    >>> tuple(data.x_train.shape), tuple(data.x_test.shape)
    ((1437, 64), (360, 64))
    """
    test_size = check_fraction("test_size", test_size, allow_zero=False)
    val_size = check_fraction("val_size", val_size, allow_zero=True)
    kept = _check_classes(classes)

    x, y = _digits_arrays()
    train_idx, test_idx = stratified_split(y, test_size, seed, "test_size")
    val_idx = train_idx[:0]
    if val_size > 0:
        rest, taken = stratified_split(y[train_idx], val_size, seed, "val_size")
        train_idx, val_idx = train_idx[rest], train_idx[taken]

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
    return DataSplit(
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
        image_shape=DIGITS_IMAGE_SHAPE,
        mean=torch.zeros(1),
        std=torch.ones(1),
        source="digits",
    )
