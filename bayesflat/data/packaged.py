"""Data that scikit-learn ships, read without importing scikit-learn.

The embedded digits and the sample photographs are files inside the scikit-learn package;
:func:`sklearn_file` finds them from the package's import location without running its
``__init__`` (importing ``sklearn.datasets`` and ``sklearn.model_selection`` costs about as
much as importing torch, most of a short run's start-up). :func:`stratified_indices` is the
stratified split of ``sklearn.model_selection.train_test_split`` written out, so a split
needs no scikit-learn import either; tests check both against scikit-learn itself.
"""

from __future__ import annotations

import gzip
import importlib.util
import math
from pathlib import Path

import numpy as np

__all__ = ["digits_table", "sample_photographs", "sklearn_file", "stratified_indices"]


def sklearn_file(*parts: str) -> Path | None:
    """The file or folder ``sklearn/<parts...>`` of the installed scikit-learn, found without
    importing it; None when scikit-learn is not installed or does not hold it."""
    spec = importlib.util.find_spec("sklearn")
    roots = spec.submodule_search_locations if spec is not None else None
    for root in roots or []:
        path = Path(root, *parts)
        if path.exists():
            return path
    return None


def digits_table() -> tuple[np.ndarray, np.ndarray]:
    """``(pixels, labels)`` of scikit-learn's digits, as ``sklearn.datasets.load_digits`` gives
    them: float64 pixel counts ``(1797, 64)`` and int labels ``(1797,)``."""
    path = sklearn_file("datasets", "data", "digits.csv.gz")
    if path is None:  # another layout: scikit-learn's own loader, with its errors
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.data, bunch.target
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",")
    return table[:, :-1], table[:, -1].astype(int)


def sample_photographs() -> list[np.ndarray]:
    """The photographs of ``sklearn.datasets.load_sample_images`` (uint8 ``(H, W, 3)``, in
    file-name order: ``china.jpg``, ``flower.jpg``)."""
    folder = sklearn_file("datasets", "images")
    if folder is None:
        from sklearn.datasets import load_sample_images

        return list(load_sample_images().images)
    from PIL import Image

    photos = []
    for path in sorted(folder.glob("*.jpg")):
        with path.open("rb") as handle:
            photos.append(np.asarray(Image.open(handle)))
    return photos


def stratified_indices(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(kept, taken)`` of a stratified split taking ``ceil(fraction * n)`` examples.

    The split ``sklearn.model_selection.train_test_split(arange(n), test_size=fraction,
    random_state=seed, stratify=labels)`` makes, draw for draw from
    ``numpy.random.RandomState(seed)``: the taken count ``t = ceil(fraction n)`` and kept
    count ``n - t`` are shared out over the classes in proportion to their sizes (the
    fractional remainders rounded up, largest first, ties broken at random), each class's
    examples are permuted and cut into its two shares, and each part is permuted again.

    Raises
    ------
    ValueError
        If a class has fewer than 2 examples, or a part would have fewer examples than there
        are classes.
    """
    labels = np.asarray(labels)
    n = len(labels)
    taken_count = math.ceil(fraction * n)
    kept_count = n - taken_count
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if counts.min() < 2:
        raise ValueError(
            f"classes {classes[counts < 2].tolist()} have only 1 example; every class needs 2"
        )
    for part, size in (("kept", kept_count), ("taken", taken_count)):
        if size < len(classes):
            raise ValueError(
                f"the {part} part would hold {size} examples, fewer than the {len(classes)} classes"
            )
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    kept_shares = _shares(counts, kept_count, rng)
    taken_shares = _shares(counts - kept_shares, taken_count, rng)
    kept: list[np.integer] = []
    taken: list[np.integer] = []
    for index, size, k, t in zip(members, counts, kept_shares, taken_shares, strict=True):
        shuffled = index.take(rng.permutation(size), mode="clip")
        kept.extend(shuffled[:k])
        taken.extend(shuffled[k : k + t])
    return rng.permutation(kept), rng.permutation(taken)


def _shares(counts: np.ndarray, total: int, rng: np.random.RandomState) -> np.ndarray:
    """``total`` shared out in proportion to ``counts``: each share floored, then the shortfall
    given one by one to the largest remainders, ties in random order."""
    exact = counts / counts.sum() * total
    shares = np.floor(exact)
    missing = int(total - shares.sum())
    remainders = exact - shares
    for value in np.sort(np.unique(remainders))[::-1]:
        if missing <= 0:
            break
        (tied,) = np.where(remainders == value)
        chosen = rng.choice(tied, size=min(len(tied), missing), replace=False)
        shares[chosen] += 1
        missing -= len(chosen)
    return shares.astype(int)
