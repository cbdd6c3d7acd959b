"""The state of a chain between two steps, and its checkpoint file.

A :class:`ChainState` holds everything a chain needs to continue exactly: the module's and the
sampler's ``state_dict`` (the sampler's includes its generator), the minibatch stream's state,
torch's global generator inside the chain (dropout), and the counters. Checkpoint files are
written with :func:`torch.save` to a temporary name and published with :func:`os.replace`, so a
killed process leaves either the previous checkpoint or the new one, never half of one; they
are read back with ``weights_only=True`` (no code runs on load).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bayesflat import _io

__all__ = ["ChainState", "load_checkpoint", "save_checkpoint", "snapshot"]


@dataclass
class ChainState:
    """Counters and states of one chain after its last kept draw.

    Attributes
    ----------
    chain : int
        Global chain index.
    step : int
        Sampler steps taken.
    collected : int
        Steps counted for thinning (after burn-in, in sampling phases).
    points : int
        Points of the step loop at which a draw was due (equal to ``kept`` except for
        samplers whose draws are taken after the last step).
    kept : int
        Draws written.
    running : float
        Exponential average of the potential (progress display).
    module, sampler, stream, rng, grads : dict
        ``state_dict`` of the module, the sampler and the minibatch stream; torch's global
        generator states; the gradients of the last step (statistics read them).
    done : bool
        Whether the chain has finished.
    """

    chain: int
    step: int = 0
    collected: int = 0
    points: int = 0
    kept: int = 0
    running: float = float("nan")
    done: bool = False
    module: dict[str, Any] = field(default_factory=dict, repr=False)
    sampler: dict[str, Any] = field(default_factory=dict, repr=False)
    stream: dict[str, Any] = field(default_factory=dict, repr=False)
    rng: dict[str, Any] = field(default_factory=dict, repr=False)
    grads: dict[str, Any] = field(default_factory=dict, repr=False)

    def finished(self) -> ChainState:
        """A copy marked ``done``."""
        return dataclasses.replace(self, done=True)

    def restore(self, module: nn.Module, sampler: Any, stream: Any) -> None:
        """Load the states into a freshly built chain (inside its ``fork_rng``)."""
        module.load_state_dict(self.module)
        for name, p in module.named_parameters():
            if name in self.grads:
                p.grad = self.grads[name].to(p.device)
        sampler.load_state_dict(self.sampler)
        stream.load_state_dict(self.stream)
        if "cpu" in self.rng:
            torch.set_rng_state(self.rng["cpu"])
        for index, value in self.rng.get("cuda", {}).items():
            torch.cuda.set_rng_state(value, int(index))

    def to_dict(self) -> dict[str, Any]:
        """Plain containers and tensors only (what ``weights_only`` loading admits)."""
        return dataclasses.asdict(self)


def snapshot(counters: ChainState, module: nn.Module, sampler: Any, stream: Any) -> ChainState:
    """``counters`` with copies of the current module, sampler, stream and RNG states."""
    rng: dict[str, Any] = {"cpu": torch.get_rng_state()}
    devices = {p.device for p in module.parameters() if p.device.type == "cuda"}
    if devices:
        rng["cuda"] = {str(d.index or 0): torch.cuda.get_rng_state(d) for d in devices}
    return dataclasses.replace(
        counters,
        module={k: v.detach().clone() for k, v in module.state_dict().items()},
        sampler=_clone(sampler.state_dict()),
        stream=_clone(stream.state_dict()),
        rng=rng,
        grads={
            n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None
        },
    )


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_clone(v) for v in value)
    return copy.copy(value)


def save_checkpoint(path: str | os.PathLike[str], state: ChainState) -> None:
    """Write ``state`` atomically (``torch.save`` to a temporary file, then rename)."""
    with _io.atomic_path(path, fsync=False) as temporary:
        torch.save(state.to_dict(), temporary)


def load_checkpoint(path: str | os.PathLike[str]) -> ChainState:
    """Read a checkpoint written by :func:`save_checkpoint`."""
    path = Path(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a readable chain checkpoint: {err}") from err
    return ChainState(**data)
