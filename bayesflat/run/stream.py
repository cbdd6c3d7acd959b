"""Training data for a run, and the resumable minibatch stream of one chain.

:class:`TrainData` holds the training set (tensors or a map-style Dataset) in a form that can
be sent to another process. :class:`MinibatchStream` draws minibatches from it: every epoch a
fresh permutation from the chain's generator, the last partial batch dropped. Its
:meth:`~MinibatchStream.state_dict` is the generator state at the start of the epoch and the
number of batches already taken, so a chain can stop after any step and continue with exactly
the batches it would have seen.

Augmentations of a Dataset draw from torch's global CPU generator; the stream seeds it for every
batch from ``(seed, epoch, batch)`` inside :func:`torch.random.fork_rng`, so they are
reproducible and resumable too and leave the caller's random state alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, default_collate

from bayesflat._checks import check_int

__all__ = ["MinibatchStream", "TrainData", "as_tensor", "fingerprint"]


def as_tensor(x: object, argname: str, dtype: torch.dtype | None = None) -> Tensor:
    """``x`` (tensor or numpy array) as a tensor; float64 becomes float32 unless ``dtype``."""
    if isinstance(x, Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        raise TypeError(f"{argname} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if dtype is not None:
        t = t.to(dtype)
    elif t.is_floating_point() and t.dtype == torch.float64:
        t = t.float()
    return t


def fingerprint(*tensors: Tensor | None) -> str:
    """SHA-256 of the shapes, dtypes and bytes of ``tensors`` (first 16 hex digits)."""
    digest = hashlib.sha256()
    for t in tensors:
        if t is None:
            digest.update(b"none")
            continue
        t = t.detach().cpu().contiguous()
        digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


class TrainData:
    """The training set: ``(inputs, targets)`` tensors or arrays, a Dataset or a DataLoader.

    A DataLoader contributes its dataset and collate function; the order of the minibatches
    always comes from the chain's generator (so ``shuffle`` and ``sampler`` are not used).

    Parameters
    ----------
    data : (inputs, targets), Dataset or DataLoader
    argname : str
        Name used in error messages.
    """

    def __init__(self, data: object, argname: str = "train_data") -> None:
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.dataset: Dataset | None = None
        self.collate = default_collate
        if isinstance(data, DataLoader):
            self.dataset = data.dataset
            self.collate = data.collate_fn or default_collate
        elif isinstance(data, Dataset):
            self.dataset = data
        elif isinstance(data, tuple | list) and len(data) == 2:
            self.x = as_tensor(data[0], f"{argname}[0]")
            self.y = as_tensor(data[1], f"{argname}[1]")
            if self.x.shape[0] != self.y.shape[0]:
                raise ValueError(
                    f"{argname} inputs and targets differ in length: "
                    f"{self.x.shape[0]} vs {self.y.shape[0]}"
                )
        else:
            raise TypeError(
                f"{argname} must be (inputs, targets) tensors or arrays, a torch Dataset or a "
                f"DataLoader, got {type(data).__name__}"
            )
        try:
            self.num_examples = len(self.dataset) if self.dataset is not None else len(self.x)
        except TypeError as err:
            raise TypeError(f"{argname} must have a length (a map-style Dataset)") from err
        if self.num_examples < 1:
            raise ValueError(f"{argname} is empty")

    @property
    def is_tensors(self) -> bool:
        """Whether the data are in-memory tensors (no Dataset)."""
        return self.x is not None

    def fingerprint(self) -> str:
        """Identity of the data: a hash of the tensors, or the Dataset's type and length."""
        if self.x is not None:
            return fingerprint(self.x, self.y)
        return f"{type(self.dataset).__qualname__}:{self.num_examples}"

    def take(self, indices: Sequence[int] | Tensor) -> tuple[Any, Any]:
        """The examples at ``indices`` as one batch ``(inputs, targets)`` on the CPU."""
        if self.x is not None and self.y is not None:
            idx = torch.as_tensor(indices, dtype=torch.long)
            return self.x[idx], self.y[idx]
        idx = [int(i) for i in indices]
        getitems = getattr(self.dataset, "__getitems__", None)
        items = getitems(idx) if callable(getitems) else [self.dataset[i] for i in idx]
        batch = self.collate(items)
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise TypeError("train_data items must be (input, target) pairs")
        return batch[0], batch[1]

    def one_pass(self, batch_size: int, device: torch.device) -> Iterable[tuple[Tensor, Tensor]]:
        """Re-iterable single pass in the stored order (last partial batch kept)."""
        return _OnePass(self, batch_size, device)


class _OnePass:
    def __init__(self, data: TrainData, batch_size: int, device: torch.device) -> None:
        self.data, self.batch_size, self.device = data, batch_size, device

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n, b = self.data.num_examples, self.batch_size
        for start in range(0, n, b):
            xb, yb = self.data.take(range(start, min(start + b, n)))
            yield _to(xb, self.device), _to(yb, self.device)


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, Tensor) else value


class MinibatchStream:
    """Endless minibatches of one chain, resumable after any batch.

    Parameters
    ----------
    data : TrainData
    batch_size : int
        ``|B|``; at most the number of examples.
    seed : int
        Seed of the chain's data generator.
    device : torch.device
        Where batches are placed.
    shard : (rank, world), optional
        Data-parallel runs: every process draws the same global batch and keeps its
        contiguous ``batch_size / world`` slice.
    """

    def __init__(
        self,
        data: TrainData,
        batch_size: int,
        seed: int,
        device: torch.device,
        shard: tuple[int, int] | None = None,
    ) -> None:
        self.data = data
        self.batch_size = check_int(batch_size, "batch_size", 1)
        if self.batch_size > data.num_examples:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {data.num_examples} training examples; "
                "choose batch_size <= len(train_data)"
            )
        self.seed = int(seed)
        self.device = device
        self.shard = shard
        self.generator = torch.Generator().manual_seed(self.seed)
        self.per_epoch = data.num_examples // self.batch_size
        self.epoch = -1
        self.offset = self.per_epoch  # forces a new epoch on the first batch
        self._epoch_state = self.generator.get_state()
        self._order: Tensor | None = None
        if data.is_tensors:
            self._x = data.x.to(device)  # type: ignore[union-attr]
            self._y = data.y.to(device)  # type: ignore[union-attr]

    def _new_epoch(self) -> None:
        self.epoch += 1
        self.offset = 0
        self._epoch_state = self.generator.get_state()
        self._order = torch.randperm(self.data.num_examples, generator=self.generator)

    def __iter__(self) -> MinibatchStream:
        return self

    def __next__(self) -> tuple[Any, Any]:
        idx = self.next_indices()
        if self.data.is_tensors:
            idx = idx.to(self.device)
            return self._x[idx], self._y[idx]
        with torch.random.fork_rng(devices=[]):
            # The CPU generator alone: it is what transforms draw from and all that fork_rng
            # restores here. torch.manual_seed would also reseed (or queue a reseeding of)
            # every accelerator's generator, formatting a stack trace per backend: ~0.2 ms
            # a batch on a CPU-only machine.
            torch.default_generator.manual_seed(_batch_seed(self.seed, self.epoch, self.offset - 1))
            xb, yb = self.data.take(idx)
        return _to(xb, self.device), _to(yb, self.device)

    def next_indices(self) -> Tensor:
        """Advance by one batch and return its example indices (what ``next`` would load)."""
        if self.offset >= self.per_epoch:
            self._new_epoch()
        assert self._order is not None
        start = self.offset * self.batch_size
        idx = self._order[start : start + self.batch_size]
        if self.shard is not None:
            rank, world = self.shard
            part = self.batch_size // world
            idx = idx[rank * part : (rank + 1) * part]
        self.offset += 1
        return idx

    def state_dict(self) -> dict[str, Any]:
        """``{"epoch": e, "offset": batches taken in it, "generator": state at its start}``."""
        return {"epoch": self.epoch, "offset": self.offset, "generator": self._epoch_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where :meth:`state_dict` was taken."""
        self.generator.set_state(state["generator"])
        if state["epoch"] < 0:
            self.epoch, self.offset = -1, self.per_epoch
            self._epoch_state = self.generator.get_state()
            return
        self.epoch = int(state["epoch"]) - 1
        self._new_epoch()
        self.offset = int(state["offset"])


def _batch_seed(seed: int, epoch: int, batch: int) -> int:
    words = np.random.SeedSequence([seed, epoch, batch]).generate_state(2, dtype=np.uint32)
    return int(words[0]) << 32 | int(words[1])
