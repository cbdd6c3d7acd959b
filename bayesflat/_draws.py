r"""Sums of per-draw features over the draws of every chain, accumulated slab by slab.

Every Monte-Carlo estimate of :func:`bayesflat.predictive.estimate` is a function of a few
sums of the per-draw features :math:`F^{(c,d)}` (class probabilities, member entropies,
energies ...) of ``C`` chains with ``D`` draws each:

- the sum of each chain, :math:`S_c = \sum_d F^{(c,d)}` (the BMA is
  :math:`\sum_c S_c / CD`; the ``"spread"`` error uses each :math:`S_c / D`);
- the sums of the jackknife's batches: each chain's last :math:`bL` draws cut into
  :math:`b = \lfloor D/L \rfloor` batches of :math:`L` consecutive draws;
- the last draw of each chain (``ensemble="final"``);
- the bootstrap replicates :math:`\sum_{c,d} w_{rcd} F^{(c,d)}` for replicate weights
  :math:`w`;
- the sums of the first :math:`k` draws of each chain, and draw :math:`k` itself, at a few
  chosen :math:`k` (metrics against the number of draws).

:class:`DrawReducer` accumulates them from slabs of consecutive draws (all chains at once), so
an estimate never needs every draw in memory: the memory is that of one slab plus
:math:`O(C\sqrt{D})` feature-sized sums, whatever the number of draws.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DrawReducer", "DrawSums"]


@dataclass
class DrawSums:
    """The sums a :class:`DrawReducer` accumulated (float64, feature shapes ``(...)``).

    Attributes
    ----------
    chains, draws : int
        ``C`` and ``D``.
    chain : dict of feature key to ndarray, shape (C, ...)
        Sum over the draws of each chain.
    last : dict of feature key to ndarray, shape (C, ...)
        Last draw of each chain.
    batch_length : int
        ``L``; 0 when no batch sums were kept.
    batch : dict of feature key to ndarray, shape (C * b, ...)
        Sum of each batch, chain-major (chain 0's batches first), oldest batch first.
    boot : dict of feature key to ndarray, shape (R, ...)
        Weighted sum of each bootstrap replicate (empty without weights).
    prefix : dict of int to dict of feature key to ndarray, shape (C, ...)
        For each chosen ``k``: the sum over the first ``k`` draws of each chain.
    at : dict of int to dict of feature key to ndarray, shape (C, ...)
        For each chosen ``k``: draw ``k`` (1-based, the ``k``-th draw) of each chain.
    """

    chains: int
    draws: int
    chain: dict[Hashable, np.ndarray]
    last: dict[Hashable, np.ndarray]
    batch_length: int = 0
    batch: dict[Hashable, np.ndarray] = field(default_factory=dict)
    boot: dict[Hashable, np.ndarray] = field(default_factory=dict)
    prefix: dict[int, dict[Hashable, np.ndarray]] = field(default_factory=dict)
    at: dict[int, dict[Hashable, np.ndarray]] = field(default_factory=dict)

    def total(self) -> dict[Hashable, np.ndarray]:
        """The average over all draws of all chains, :math:`\\sum_c S_c / CD`."""
        return {k: v.sum(axis=0) / (self.chains * self.draws) for k, v in self.chain.items()}


class DrawReducer:
    r"""Accumulate :class:`DrawSums` from slabs of consecutive draws.

    Parameters
    ----------
    chains, draws : int
        ``C`` and ``D`` of the features to come.
    batch_length : int, optional
        ``L`` of the batch sums (none when None or when there would be fewer than two
        batches).
    boot_weights : ndarray, shape (R, C, D), optional
        Bootstrap replicate weights :math:`w_{rcd}`.
    points : sequence of int, optional
        Draw counts ``k`` in ``[1, D]`` whose prefix sums and draw are kept.
    point_keys : sequence of feature keys, optional
        Features whose prefix sums are kept (default all).

    Notes
    -----
    Call :meth:`add` with slabs that cover draws ``0 .. D-1`` in order, then :meth:`result`.
    """

    def __init__(
        self,
        chains: int,
        draws: int,
        *,
        batch_length: int | None = None,
        boot_weights: np.ndarray | None = None,
        points: Sequence[int] = (),
        point_keys: Sequence[Hashable] | None = None,
    ) -> None:
        self.chains, self.draws = int(chains), int(draws)
        self.length = 0
        if batch_length is not None and self.chains * (self.draws // batch_length) >= 2:
            self.length = int(batch_length)
        self.per_chain = self.draws // self.length if self.length else 0
        self.start = self.draws - self.per_chain * self.length
        self.weights = boot_weights
        if boot_weights is not None and boot_weights.shape[1:] != (self.chains, self.draws):
            raise ValueError(
                f"boot_weights must have shape (R, {self.chains}, {self.draws}), got "
                f"{boot_weights.shape}"
            )
        self.points = sorted({int(k) for k in points})
        self.point_keys = None if point_keys is None else set(point_keys)
        self.seen = 0
        self.sums: DrawSums | None = None

    def _allocate(self, slab: Mapping[Hashable, np.ndarray]) -> DrawSums:
        def zeros(lead: int, value: np.ndarray) -> np.ndarray:
            return np.zeros((lead, *value.shape[2:]), dtype=np.float64)

        c, b = self.chains, self.per_chain
        sums = DrawSums(
            chains=c,
            draws=self.draws,
            chain={k: zeros(c, v) for k, v in slab.items()},
            last={k: zeros(c, v) for k, v in slab.items()},
            batch_length=self.length,
        )
        if self.length:
            sums.batch = {k: zeros(c * b, v) for k, v in slab.items()}
        if self.weights is not None:
            sums.boot = {k: zeros(self.weights.shape[0], v) for k, v in slab.items()}
        return sums

    def add(self, slab: Mapping[Hashable, np.ndarray]) -> None:
        """Add the next slab: per feature an array ``(C, d, ...)`` of the next ``d`` draws."""
        d = next(iter(slab.values())).shape[1]
        for key, value in slab.items():
            if value.shape[:2] != (self.chains, d):
                raise ValueError(
                    f"slab {key!r} has shape {value.shape}; expected ({self.chains}, {d}, ...)"
                )
        if self.seen + d > self.draws:
            raise ValueError(f"slabs cover more than the {self.draws} draws announced")
        if self.sums is None:
            self.sums = self._allocate(slab)
        sums, d0 = self.sums, self.seen
        for key, value in slab.items():
            value = np.asarray(value, dtype=np.float64)
            if self.point_keys is None or key in self.point_keys:
                self._add_points(sums, key, value, d0)
            sums.chain[key] += value.sum(axis=1)
            if d0 + d == self.draws:
                sums.last[key] = value[:, -1].copy()
            if self.length:
                self._add_batches(sums.batch[key], value, d0)
            if self.weights is not None:
                w = self.weights[:, :, d0 : d0 + d].reshape(self.weights.shape[0], -1)
                sums.boot[key] += (w @ value.reshape(self.chains * d, -1)).reshape(
                    sums.boot[key].shape
                )
        self.seen += d

    def _add_batches(self, batch: np.ndarray, value: np.ndarray, d0: int) -> None:
        d, length, b = value.shape[1], self.length, self.per_chain
        first = max(0, (d0 - self.start) // length)
        for j in range(first, b):
            lo, hi = self.start + j * length, self.start + (j + 1) * length
            if lo >= d0 + d:
                break
            s, e = max(lo, d0), min(hi, d0 + d)
            if s < e:
                rows = np.arange(self.chains) * b + j
                batch[rows] += value[:, s - d0 : e - d0].sum(axis=1)

    def _add_points(self, sums: DrawSums, key: str, value: np.ndarray, d0: int) -> None:
        d = value.shape[1]
        running = sums.chain[key]  # the sum of the draws before this slab
        for k in self.points:
            if d0 < k <= d0 + d:
                sums.prefix.setdefault(k, {})[key] = running + value[:, : k - d0].sum(axis=1)
                sums.at.setdefault(k, {})[key] = value[:, k - d0 - 1].copy()

    def result(self) -> DrawSums:
        """The accumulated sums; every draw must have been added."""
        if self.sums is None or self.seen != self.draws:
            raise ValueError(f"slabs covered {self.seen} of the {self.draws} draws announced")
        return self.sums
