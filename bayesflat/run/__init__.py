"""The run engine: chains as pure functions of (spec, chain, state), streamed to disk.

- :mod:`~bayesflat.run.spec`: the frozen description of a run and the chains' seeds;
- :mod:`~bayesflat.run.stream`: training data and the resumable minibatch stream;
- :mod:`~bayesflat.run.chain`: :func:`run_chain`, the loop of one chain;
- :mod:`~bayesflat.run.checkpoint`: chain states and their atomic checkpoint files;
- :mod:`~bayesflat.run.sinks`: where draws go (memory, a run folder) and the run folder;
- :mod:`~bayesflat.run.executors`, :mod:`~bayesflat.run.distributed`,
  :mod:`~bayesflat.run.vectorised`: where chains run;
- :mod:`~bayesflat.run.api`: :func:`sample` and :func:`resume`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bayesflat._lazy import lazy_attributes

if TYPE_CHECKING:
    from bayesflat.run.api import SamplingError, make_spec, resume, sample
    from bayesflat.run.chain import run_chain
    from bayesflat.run.checkpoint import ChainState
    from bayesflat.run.spec import ChainContext, RunSpec, chain_seeds

__all__ = [
    "ChainContext",
    "ChainState",
    "RunSpec",
    "SamplingError",
    "chain_seeds",
    "make_spec",
    "resume",
    "run_chain",
    "sample",
]

_MODULES: dict[str, tuple[str, ...]] = {
    "api": ("SamplingError", "make_spec", "resume", "sample"),
    "chain": ("run_chain",),
    "checkpoint": ("ChainState",),
    "spec": ("ChainContext", "RunSpec", "chain_seeds"),
}
"""Public names by submodule, loaded on first use: reading a run folder (``sinks``, ``lock``)
needs neither torch nor the sampling loop."""

__getattr__, __dir__ = lazy_attributes(
    __name__,
    _MODULES,
    ("distributed", "executors", "lock", "progress", "sinks", "stream", "vectorised"),
)
