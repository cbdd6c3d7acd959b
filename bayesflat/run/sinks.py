"""Where kept draws go: memory, or a run folder on disk.

A sink receives every kept draw of every chain (:meth:`Sink.write`) and turns them into one
trace (:meth:`Sink.finish`). Both sinks lay the draws out through
:mod:`bayesflat.trace.schema`, so a run gives the same trace, array for array, whichever sink
it used.

The run folder
--------------
::

    run.json                  settings, identity of the run, status (written atomically)
    static.nc                 labels and constants (observed_data, constant_data)
    chains/chain_0003/
        checkpoint.pt         the chain's state after its last checkpointed draw
        draws_0000000_0000050.h5   draws 0..49 of chain 3 (one file per flush)
    trace.nc                  the assembled trace, once every chain has finished

Draw files are immutable: each flush publishes a new file by rename, because an HDF5 file
appended in place can be left unreadable by a process killed in the middle of a write. They
are plain HDF5 (one dataset per variable, draws along the first axis, its dimension names in
an attribute), written with h5py in about 3 ms; netCDF's dimension scales cost 30 times that
per file, and the run folder's ``trace.nc``, assembled from them, is the netCDF4 file that
ArviZ reads. The checkpoint says how many draws count; files beyond it (written after the last
checkpoint by a run that was then killed) are removed or cut back when the chain resumes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import xarray as xr

from bayesflat import _io
from bayesflat.run.checkpoint import ChainState, load_checkpoint, save_checkpoint
from bayesflat.trace import schema
from bayesflat.trace.build import assemble, build_trace, static_groups
from bayesflat.trace.io import open_groups, write_concatenated, write_groups

__all__ = ["FolderSink", "MemorySink", "RunFolder", "Static", "load_folder"]

_FLOAT64_GROUPS = ("sample_stats", "log_likelihood", "heldout_log_likelihood")
_DRAWS = re.compile(r"draws_(\d{7})_(\d{7})\.h5$")


class Static:
    """What a trace holds besides its draws: labels, constants, dimension labels, settings."""

    def __init__(
        self,
        *,
        observed_data: Mapping[str, Any] | None = None,
        constant_data: Mapping[str, Any] | None = None,
        coords: Mapping[str, Sequence[Any]] | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> None:
        self.observed_data = dict(observed_data or {})
        self.constant_data = dict(constant_data or {})
        self.coords = {k: list(v) for k, v in (coords or {}).items()}
        self.attrs = dict(attrs or {})

    def run_attrs(self, kept: Sequence[int], *, complete: bool, reason: str) -> dict[str, Any]:
        """Root attributes of the trace: settings plus how far every chain got."""
        return {
            **self.attrs,
            "chains": len(kept),
            "complete": complete,
            "stop_reason": reason,
            "draws_kept": list(kept),
        }


class MemorySink:
    """Keeps every draw in arrays (NaN where a chain has not reached a draw)."""

    def __init__(self, chains: int, draws: int) -> None:
        self.chains, self.draws = chains, draws
        self._kept = [0] * chains
        self._arrays: dict[str, dict[str, np.ndarray]] = {}

    def begin(self, chain: int, kept: int) -> None:
        """Start (or continue) ``chain`` at draw ``kept``."""
        self._kept[chain] = kept

    def write(self, chain: int, draw: int, record: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Store one draw."""
        for group, variables in record.items():
            store = self._arrays.setdefault(group, {})
            for name, value in variables.items():
                value = np.asarray(value)
                array = store.get(name)
                if array is None:
                    dtype = np.float64 if group in _FLOAT64_GROUPS else np.float32
                    if value.dtype == np.float16:  # predictions stored in half precision
                        dtype = np.float16
                    array = store[name] = np.full(
                        (self.chains, self.draws, *value.shape), np.nan, dtype=dtype
                    )
                array[chain, draw] = value
        self._kept[chain] = draw + 1

    def flush(self, chain: int) -> None:
        """Nothing to do in memory."""

    def pending_bytes(self, chain: int) -> int:
        """Always 0: nothing waits to be written."""
        return 0

    def kept(self, chain: int) -> int:
        """Draws of ``chain`` stored so far."""
        return self._kept[chain]

    def finish(self, static: Static, *, complete: bool, reason: str = "") -> Any:
        """The trace of every chain (partial chains NaN-padded)."""
        if not any(self._kept):
            raise ValueError("no chain kept a draw")
        return build_trace(
            **{group: self._arrays.get(group) for group in schema.DRAW_GROUPS},
            observed_data=static.observed_data or None,
            constant_data=static.constant_data or None,
            coords=static.coords,
            attrs=static.run_attrs(self._kept, complete=complete, reason=reason),
        )


class RunFolder:
    """The files of a run folder (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def static_nc(self) -> Path:
        return self.path / "static.nc"

    @property
    def trace_nc(self) -> Path:
        return self.path / "trace.nc"

    def chain_dir(self, chain: int) -> Path:
        return self.path / "chains" / f"chain_{chain:04d}"

    def checkpoint_path(self, chain: int) -> Path:
        return self.chain_dir(chain) / "checkpoint.pt"

    def exists(self) -> bool:
        """Whether the folder holds a run (its ``run.json``)."""
        return self.run_json.is_file()

    def read_meta(self) -> dict[str, Any]:
        """The contents of ``run.json``."""
        try:
            return json.loads(self.run_json.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"{self.run_json} is not a readable run description: {err}") from err

    def write_meta(self, meta: Mapping[str, Any]) -> None:
        """Replace ``run.json`` atomically."""
        with _io.atomic_path(self.run_json) as temporary:
            temporary.write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))

    def write_static(self, static: Static) -> None:
        """Write ``static.nc`` (labels and constants)."""
        parts = static_groups(static.observed_data, static.constant_data)
        write_groups(self.static_nc, parts, schema.provenance())

    def read_static(self, attrs: Mapping[str, Any], coords: Mapping[str, Any]) -> Static:
        """The :class:`Static` stored in the folder."""
        parts: dict[str, xr.Dataset] = {}
        if self.static_nc.is_file():
            parts, _ = open_groups(self.static_nc)

        def plain(group: str) -> dict[str, np.ndarray]:
            data = parts.get(group)
            if data is None:
                return {}
            return {schema.decode_name(k): v.values for k, v in data.data_vars.items()}

        return Static(
            observed_data=plain("observed_data"),
            constant_data=plain("constant_data"),
            coords=coords,
            attrs=attrs,
        )

    def checkpoint(self, chain: int) -> ChainState | None:
        """The chain's last checkpoint, or None."""
        path = self.checkpoint_path(chain)
        return load_checkpoint(path) if path.is_file() else None

    def save_checkpoint(self, state: ChainState) -> None:
        """Write the chain's checkpoint atomically."""
        save_checkpoint(self.checkpoint_path(state.chain), state)

    def draw_files(self, chain: int) -> list[tuple[int, int, Path]]:
        """``(start, stop, path)`` of the chain's draw files, in order."""
        folder = self.chain_dir(chain)
        if not folder.is_dir():
            return []
        out = []
        for path in folder.iterdir():
            match = _DRAWS.match(path.name)
            if match:
                out.append((int(match.group(1)), int(match.group(2)), path))
        return sorted(out)

    def remove_temporaries(self) -> None:
        """Remove temporary files left by a killed writer."""
        for path in self.path.rglob(".*.tmp"):
            path.unlink(missing_ok=True)


class FolderSink:
    """Writes every chain's draws into a run folder as they are kept.

    Draws are buffered per chain until :meth:`flush` (the run engine flushes before every
    checkpoint, and whenever more than 64 MiB wait), which publishes them as one immutable
    netCDF file.
    """

    def __init__(
        self, folder: RunFolder, chains: int, draws: int, coords: Mapping[str, Any]
    ) -> None:
        self.folder = folder
        self.chains, self.draws = chains, draws
        self.coords = dict(coords)
        self._buffer: dict[int, list[Mapping[str, Mapping[str, np.ndarray]]]] = {}
        self._start: dict[int, int] = {}
        self._bytes: dict[int, int] = {}

    def begin(self, chain: int, kept: int) -> None:
        """Start (or continue) ``chain`` at draw ``kept``: draw files beyond it are cut back."""
        self.folder.chain_dir(chain).mkdir(parents=True, exist_ok=True)
        for start, stop, path in self.folder.draw_files(chain):
            if start >= kept:
                path.unlink()
            elif stop > kept:
                arrays, dims = read_draws(path)
                cut = {g: {v: a[: kept - start] for v, a in vs.items()} for g, vs in arrays.items()}
                self._write(chain, start, kept, cut, dims)
                path.unlink()
        self._buffer[chain] = []
        self._start[chain] = kept
        self._bytes[chain] = 0

    def write(self, chain: int, draw: int, record: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Buffer one draw (``draw`` must follow the previous one)."""
        expected = self._start[chain] + len(self._buffer[chain])
        if draw != expected:
            raise ValueError(f"chain {chain}: draw {draw} written where draw {expected} was due")
        self._buffer[chain].append(record)
        self._bytes[chain] += sum(np.asarray(v).nbytes for g in record.values() for v in g.values())

    def pending_bytes(self, chain: int) -> int:
        """Bytes buffered for ``chain``."""
        return self._bytes.get(chain, 0)

    def kept(self, chain: int) -> int:
        """Draws of ``chain`` written (flushed or buffered)."""
        return self._start.get(chain, 0) + len(self._buffer.get(chain, []))

    def flush(self, chain: int) -> None:
        """Publish the buffered draws of ``chain`` as one file."""
        records = self._buffer.get(chain)
        if not records:
            return
        start = self._start[chain]
        stop = start + len(records)
        arrays: dict[str, dict[str, np.ndarray]] = {}
        dims: dict[str, dict[str, tuple[str, ...]]] = {}
        for group in schema.DRAW_GROUPS:
            names = records[0].get(group)
            if not names:
                continue
            data = {name: np.stack([r[group][name] for r in records])[None] for name in names}
            variables = schema.draw_variables(group, data, (1, len(records)))
            arrays[group] = {v: values[0] for v, (_, values) in variables.items()}
            dims[group] = {v: d for v, (d, _) in variables.items()}
        self._write(chain, start, stop, arrays, dims)
        self._buffer[chain] = []
        self._start[chain] = stop
        self._bytes[chain] = 0

    def _write(
        self,
        chain: int,
        start: int,
        stop: int,
        arrays: Mapping[str, Mapping[str, np.ndarray]],
        dims: Mapping[str, Mapping[str, tuple[str, ...]]],
    ) -> None:
        path = self.folder.chain_dir(chain) / f"draws_{start:07d}_{stop:07d}.h5"
        with _io.atomic_path(path) as temporary, h5py.File(temporary, "w") as handle:
            handle.attrs.update(created_by="bayesflat", chain=chain, start=start, stop=stop)
            for group, variables in arrays.items():
                for name, values in variables.items():
                    dataset = handle.create_dataset(f"{group}/{name}", data=values)
                    dataset.attrs["dims"] = json.dumps(dims[group][name])

    def finish(self, static: Static, *, complete: bool, reason: str = "") -> Any:
        """Assemble ``trace.nc`` from the draw files (complete runs) and return the trace."""
        kept = [self.kept(c) for c in range(self.chains)]
        if complete:
            assemble_trace(self.folder, static, kept)
            return load_folder(self.folder.path, lazy=True)
        return _partial_trace(self.folder, static, kept, reason)


def read_draws(
    path: Path,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, tuple[str, ...]]]]:
    """The arrays (``(draws, ...)``, by group and encoded name) and dimensions of a draw file."""
    arrays: dict[str, dict[str, np.ndarray]] = {}
    dims: dict[str, dict[str, tuple[str, ...]]] = {}
    try:
        with h5py.File(path, "r") as handle:
            for group, variables in handle.items():
                for name, dataset in variables.items():
                    arrays.setdefault(group, {})[name] = dataset[()]
                    dims.setdefault(group, {})[name] = tuple(json.loads(dataset.attrs["dims"]))
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"{path} is not a readable draw file: {err}") from err
    return arrays, dims


def _pieces(folder: RunFolder, kept: Sequence[int]) -> list[list[tuple[int, int, Any]]]:
    pieces = []
    for chain, count in enumerate(kept):
        chain_pieces = []
        for start, stop, path in folder.draw_files(chain):
            if start >= count:
                continue
            stop = min(stop, count)

            def read(path: Path = path, n: int = stop - start) -> dict[str, dict[str, np.ndarray]]:
                arrays, _ = read_draws(path)
                return {g: {v: a[:n] for v, a in vs.items()} for g, vs in arrays.items()}

            chain_pieces.append((start, stop, read))
        pieces.append(chain_pieces)
    return pieces


def _layout(folder: RunFolder, kept: Sequence[int]) -> tuple[dict, dict[str, int]]:
    for chain, count in enumerate(kept):
        for start, _stop, path in folder.draw_files(chain):
            if start < count:
                arrays, dims = read_draws(path)
                layout = {
                    g: {v: (dims[g][v], arrays[g][v].dtype) for v in vs} for g, vs in arrays.items()
                }
                sizes = {
                    d: size
                    for g, vs in arrays.items()
                    for v, a in vs.items()
                    for d, size in zip(dims[g][v][2:], a.shape[1:], strict=True)
                }
                return layout, sizes
    raise ValueError(f"no chain of the run in {folder.path} kept a draw")


def assemble_trace(folder: RunFolder, static: Static, kept: Sequence[int]) -> Path:
    """Write the folder's ``trace.nc`` from its draw files, then remove the draw files."""
    root = static.run_attrs(kept, complete=True, reason="")
    settings, kinds = schema.encode_attrs(root)
    stamp = schema.provenance()
    encoded = {**stamp, **settings, schema.KINDS_KEY: json.dumps(kinds, sort_keys=True)}
    layout, sizes = _layout(folder, kept)
    write_concatenated(
        folder.trace_nc,
        layout=layout,
        sizes=sizes,
        pieces=_pieces(folder, kept),
        draws=max(kept),
        static=static_groups(static.observed_data, static.constant_data),
        root=encoded,
        coords=static.coords,
        group_attrs={
            g: {**stamp, **settings} if g == "posterior" else stamp for g in schema.DRAW_GROUPS
        },
    )
    for chain in range(len(kept)):
        for _start, _stop, path in folder.draw_files(chain):
            path.unlink()
    return folder.trace_nc


def _partial_trace(folder: RunFolder, static: Static, kept: Sequence[int], reason: str) -> Any:
    sink = MemorySink(len(kept), max(1, max(kept, default=0)))
    for chain, chain_pieces in enumerate(_pieces(folder, kept)):
        sink.begin(chain, 0)
        for start, stop, read in chain_pieces:
            arrays = read()
            for i in range(stop - start):
                record = {
                    g: {schema.decode_name(v): a[i] for v, a in vs.items()}
                    for g, vs in arrays.items()
                }
                sink.write(chain, start + i, record)
        sink.begin(chain, min(kept[chain], sink.kept(chain)))
    return sink.finish(static, complete=False, reason=reason)


def load_folder(path: str | os.PathLike[str], *, lazy: bool = False) -> Any:
    """The trace of a run folder: its ``trace.nc``, or the draws kept so far."""
    folder = RunFolder(path)
    if folder.trace_nc.is_file():
        parts, root = open_groups(folder.trace_nc, lazy=lazy)
        return assemble(parts, root)
    if not folder.exists():
        raise ValueError(
            f"{folder.path} is a folder without trace.nc or run.json; expected a run folder "
            "written by bayesflat.sample(..., output=...) or `bayesflat run`"
        )
    meta = folder.read_meta()
    static = folder.read_static(meta.get("attrs", {}), meta.get("coords", {}))
    chains = int(meta["identity"]["spec"]["chains"])
    kept = []
    for chain in range(chains):
        state = folder.checkpoint(chain)
        kept.append(state.kept if state is not None else 0)
    if not any(kept):
        raise ValueError(f"the run in {folder.path} has not kept a draw yet")
    return _partial_trace(folder, static, kept, meta.get("stop_reason") or "running")


def remove_folder_contents(folder: RunFolder) -> None:
    """Delete what a previous run left in ``folder`` (used with ``overwrite``)."""
    for name in ("chains",):
        shutil.rmtree(folder.path / name, ignore_errors=True)
    for path in (folder.run_json, folder.static_nc, folder.trace_nc):
        path.unlink(missing_ok=True)
