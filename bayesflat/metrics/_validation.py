"""Conversion of metric inputs to float64/int NumPy arrays, with errors that name the argument.

Metrics take NumPy arrays, torch tensors (converted through ``.detach().cpu()``, without
importing torch) or anything ``numpy.asarray`` accepts.
"""

from __future__ import annotations

import numpy as np

ROW_SUM_TOL = 1e-4
"""Largest accepted ``|sum_k p_k - 1|`` for a row of probabilities (float32 softmax sums to 1
within ~1e-6 for K = 1000)."""

FEW_CLASSES = 32
"""Up to this many classes, :func:`class_reduce` makes one elementwise pass per class."""


def to_numpy(x) -> np.ndarray:
    """Return ``x`` as a NumPy array; floating tensors become float64 (bfloat16 has no NumPy
    dtype)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()
        x = x.numpy()
    return np.asarray(x)


def _float_array(x, name: str) -> np.ndarray:
    a = to_numpy(x)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"{name} must be a numeric array, got dtype {a.dtype}")
    return a.astype(np.float64, copy=False)


def class_reduce(ufunc: np.ufunc, a: np.ndarray) -> np.ndarray:
    """``ufunc`` (``np.add``, ``np.maximum``) folded over the last, class axis, in class order.

    NumPy reduces a short last axis row by row, at a fixed cost per row: for ten classes that
    is three times slower than one elementwise pass per class over all rows, which is what
    this does up to :data:`FEW_CLASSES` classes (beyond, ``ufunc.reduce``). Each row's result
    is the fold ``((a_0 op a_1) op a_2) ...`` of that row alone, whatever the other axes.
    """
    if a.shape[-1] > FEW_CLASSES:
        return ufunc.reduce(a, axis=-1)
    out = a[..., 0].copy()
    for k in range(1, a.shape[-1]):
        ufunc(out, a[..., k], out=out)
    return out


def check_probs(probs, name: str = "probs", *, ndim: int = 2) -> np.ndarray:
    """Validate class probabilities whose last axis is the class axis.

    ``ndim=2`` expects ``(n, K)``; ``ndim=-3`` accepts any ``(..., n, K)`` with at least three
    axes; another positive ``ndim`` demands exactly that many axes.
    """
    p = _float_array(probs, name)
    if (ndim > 0 and p.ndim != ndim) or (ndim < 0 and p.ndim < -ndim):
        layout = {2: "(n, K)", 4: "(chain, draw, n, K)", -3: "(S, n, K) or (chain, draw, n, K)"}
        raise ValueError(f"{name} must have shape {layout[ndim]}, got shape {p.shape}")
    if p.shape[-2] < 1:
        raise ValueError(f"{name} must hold at least one example, got shape {p.shape}")
    if p.shape[-1] < 2:
        raise ValueError(
            f"{name} must have at least 2 classes on its last axis, got shape {p.shape}"
        )
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} must be finite; it contains NaN or inf")
    if np.any(p < 0):
        raise ValueError(f"{name} must be non-negative; its smallest entry is {p.min():.6g}")
    err = np.abs(class_reduce(np.add, p) - 1.0)
    worst = np.unravel_index(np.argmax(err), err.shape)
    if err[worst] > ROW_SUM_TOL:
        raise ValueError(
            f"{name} rows must sum to 1 within {ROW_SUM_TOL:g}; row {tuple(map(int, worst))} "
            f"sums to {p.sum(axis=-1)[worst]:.8g}"
        )
    return p


def logsumexp_rows(z: np.ndarray) -> np.ndarray:
    """``log sum_k exp(z_ik)`` of each row of ``(n, K)`` values whose row maximum is finite
    (as :func:`check_logits` guarantees), shifted by that maximum. Plain numpy: scipy's
    ``logsumexp`` costs several times more on the small arrays it is called on here, once
    per step of the temperature fit and per draw of the energy score."""
    top = class_reduce(np.maximum, z)
    return top + np.log(class_reduce(np.add, np.exp(z - top[:, None])))


def check_logits(logits, name: str, *, normalized: bool = False) -> np.ndarray:
    """Validate ``(n, K)`` logits or log-probabilities; ``-inf`` (probability 0) is allowed.

    With ``normalized=True`` every row must satisfy ``|logsumexp(row)| <= ROW_SUM_TOL``.
    """
    z = _float_array(logits, name)
    if z.ndim != 2:
        raise ValueError(f"{name} must have shape (n, K), got shape {z.shape}")
    if z.shape[0] < 1 or z.shape[1] < 2:
        raise ValueError(f"{name} must hold at least one example and 2 classes, got {z.shape}")
    if np.any(np.isnan(z)) or np.any(z == np.inf):
        raise ValueError(f"{name} must not contain NaN or +inf")
    row_max = z.max(axis=1)
    if np.any(row_max == -np.inf):
        raise ValueError(f"{name} has a row that is -inf everywhere (no class has probability > 0)")
    if normalized:
        lse = logsumexp_rows(z)
        worst = int(np.argmax(np.abs(lse)))
        if abs(lse[worst]) > ROW_SUM_TOL:
            raise ValueError(
                f"{name} must be log-probabilities (logsumexp of each row = 0 within "
                f"{ROW_SUM_TOL:g}); row {worst} has logsumexp {lse[worst]:.8g}"
            )
    return z


def check_labels(labels, n: int, n_classes: int, name: str = "labels") -> np.ndarray:
    """Validate integer class labels of shape ``(n,)`` with values in ``[0, n_classes)``."""
    y = to_numpy(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the predictions, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(
            f"{name} must lie in [0, {n_classes}) for {n_classes} classes, "
            f"got values in [{y.min()}, {y.max()}]"
        )
    return y.astype(np.intp, copy=False)


def check_scores(scores, name: str) -> np.ndarray:
    """Validate a non-empty, finite 1-D array of scores."""
    s = _float_array(scores, name)
    if s.ndim != 1 or s.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{name} must be finite; it contains NaN or inf")
    return s
