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
        draws.bin             the chain's draws, appended as they are kept
    trace.nc                  the assembled trace, once every chain has finished

A draw file (:class:`DrawFile`) is a header that never changes, then one fixed-size record
per draw: every variable of the draw, in the header's order, as raw little-endian bytes. Draws
are only ever appended, so a process killed at any moment leaves every record before the one
being written intact; the chain's checkpoint says how many records count, and a chain that
resumes cuts the file back to them. Appending a draw costs one ``write`` (no file format to
update, no ``fsync``: a killed process loses nothing the kernel has accepted), and assembling
``trace.nc`` reads the records in blocks of a few MiB, so neither the run nor the assembly
holds more than a few MiB of draws in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bayesflat import _io
from bayesflat.trace import schema

if TYPE_CHECKING:
    import xarray as xr

    from bayesflat.run.checkpoint import ChainState

# ``bayesflat.trace.build`` and ``.io`` (xarray, pandas, h5netcdf) are imported where a trace
# is built or read, and checkpoints (torch) where a chain state is saved or loaded: a sampling
# process only appends draws, and reading a finished folder needs no torch.

__all__ = ["DrawFile", "FolderSink", "MemorySink", "RunFolder", "Static", "load_folder"]

_FLOAT64_GROUPS = ("sample_stats", "log_likelihood", "heldout_log_likelihood")
_MAGIC = b"BAYESFLAT-DRAWS1"
_APPEND_BYTES = 2**20
"""Draws a :class:`FolderSink` holds per chain before it appends them to the chain's file."""
_READ_BYTES = 4 * 2**20
"""Size of the blocks of draws read back from a draw file."""


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
        from bayesflat.trace.build import build_trace

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
        from bayesflat.trace.build import static_groups
        from bayesflat.trace.io import write_groups

        parts = static_groups(static.observed_data, static.constant_data)
        write_groups(self.static_nc, parts, schema.provenance())

    def read_static(self, attrs: Mapping[str, Any], coords: Mapping[str, Any]) -> Static:
        """The :class:`Static` stored in the folder."""
        from bayesflat.trace.io import open_groups

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
        from bayesflat.run.checkpoint import load_checkpoint

        path = self.checkpoint_path(chain)
        return load_checkpoint(path) if path.is_file() else None

    def save_checkpoint(self, state: ChainState) -> None:
        """Write the chain's checkpoint atomically."""
        from bayesflat.run.checkpoint import save_checkpoint

        save_checkpoint(self.checkpoint_path(state.chain), state)

    def draws_path(self, chain: int) -> Path:
        return self.chain_dir(chain) / "draws.bin"

    def remove_temporaries(self) -> None:
        """Remove temporary files left by a killed writer."""
        for path in self.path.rglob(".*.tmp"):
            path.unlink(missing_ok=True)


class DrawFile:
    """The draws of one chain: a header, then one fixed-size record per draw, appended.

    Layout: the 16 bytes ``BAYESFLAT-DRAWS1``; the length ``H`` of the JSON description as an
    8-byte little-endian integer; the description, ``{"chain": c, "variables": [[group,
    encoded name, dims, dtype, shape], ...]}`` with ``dims`` and ``shape`` those after
    ``(chain, draw)``; zeros up to a multiple of 64 bytes. Then record ``i`` (draw ``i``) at
    ``header + i * record_bytes``: the variables in the description's order, each as
    ``prod(shape)`` values of its little-endian dtype, C order.

    Parameters
    ----------
    path : path
        The file; its header is read at once.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        variables, self.header_bytes = self._read_header()
        self.variables = [(g, n, tuple(d), np.dtype(t), tuple(s)) for g, n, d, t, s in variables]
        self.record = np.dtype(
            [(f"{g}/{n}", t.newbyteorder("<"), s) for g, n, _, t, s in self.variables]
        )
        self._plan: dict[tuple[str, str], Any] | None = None

    @staticmethod
    def _header(chain: int, variables: Sequence[Any]) -> bytes:
        text = json.dumps(
            {
                "chain": chain,
                "variables": [
                    [g, n, list(d), np.dtype(t).newbyteorder("<").str, list(s)]
                    for g, n, d, t, s in variables
                ],
            }
        ).encode()
        head = _MAGIC + struct.pack("<Q", len(text)) + text
        return head + b"\0" * (-len(head) % 64)

    def _read_header(self) -> tuple[list[Any], int]:
        try:
            with open(self.path, "rb") as handle:
                start = handle.read(len(_MAGIC) + 8)
                if len(start) < len(_MAGIC) + 8 or start[: len(_MAGIC)] != _MAGIC:
                    raise ValueError("it does not start with the draw-file signature")
                (length,) = struct.unpack("<Q", start[len(_MAGIC) :])
                text = handle.read(length)
                described = json.loads(text)["variables"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{self.path} is not a readable draw file: {err}") from err
        head = len(start) + length
        return [tuple(v) for v in described], head + (-head % 64)

    @classmethod
    def create(cls, path: Path, chain: int, record: Mapping[str, Mapping[str, Any]]) -> DrawFile:
        """Publish an empty draw file whose layout is that of ``record`` (one draw)."""
        variables = [
            (group, name, dims[2:], values.dtype, values.shape[2:])
            for group, encoded in _encoded(record).items()
            for name, (dims, values) in encoded.items()
        ]
        with _io.atomic_path(path, fsync=False) as temporary:
            temporary.write_bytes(cls._header(chain, variables))
        return cls(path)

    def count(self) -> int:
        """Complete records in the file (a record cut short by a killed writer is not one)."""
        return (self.path.stat().st_size - self.header_bytes) // self.record.itemsize

    def encode(
        self, record: Mapping[str, Mapping[str, Any]], out: np.ndarray | None = None
    ) -> bytes:
        """The bytes of one draw in this file's layout (written into ``out``, one record, if
        given; then nothing is returned).

        Values are stored as :func:`bayesflat.trace.schema.draw_variables` stores them; the
        first draw goes through it, later ones through the plan made from the first.
        """
        target = np.empty(1, self.record) if out is None else out
        if self._plan is None:
            self._plan = self._make_plan(record)
        count = 0
        for group, variables in record.items():
            if group not in schema.DRAW_GROUPS:
                continue
            for key, value in variables.items():
                entry = self._plan.get((group, key))
                if entry is None:
                    raise self._differs(record)
                field, flag, shape = entry
                value = schema.to_numpy(value)
                if value.shape != shape:
                    raise ValueError(
                        f"{group}[{key!r}] has shape {value.shape} at one draw and {shape} at "
                        f"the earlier draws in {self.path}"
                    )
                if value.dtype.kind not in "fiub":
                    raise TypeError(f"{group}[{key!r}] has dtype {value.dtype}; expected float")
                if flag and value.dtype.kind == "f":
                    value = np.nan_to_num(value) > 0.5  # as draw_variables stores flags
                target[field] = value
                count += 1
        if count != len(self._plan):
            raise self._differs(record)
        return target.tobytes() if out is None else b""

    def _make_plan(self, record: Mapping[str, Mapping[str, Any]]) -> dict[tuple[str, str], Any]:
        """``(group, key) -> (field, stored as a flag, shape)`` for the variables of ``record``."""
        shapes = {(g, n): s for g, n, _, _, s in self.variables}
        plan = {}
        for group, encoded in _encoded(record).items():
            for key in record[group]:
                name = schema.encode_name(key)
                if (group, name) not in shapes or encoded[name][1].shape[2:] != shapes[group, name]:
                    raise self._differs(record)
                flag = group == "sample_stats" and name in schema.BOOL_STATS
                plan[group, key] = (f"{group}/{name}", flag, shapes[group, name])
        if len(plan) != len(shapes):
            raise self._differs(record)
        return plan

    def _differs(self, record: Mapping[str, Mapping[str, Any]]) -> ValueError:
        given = {
            (g, schema.encode_name(k), np.shape(v))
            for g, vs in record.items()
            if g in schema.DRAW_GROUPS
            for k, v in vs.items()
        }
        expected = {(g, n, s) for g, n, _, _, s in self.variables}
        return ValueError(
            f"a draw with variables {sorted(given ^ expected)} (group, name, shape) differs "
            f"from the earlier draws in {self.path}"
        )

    def truncate(self, count: int) -> None:
        """Keep the first ``count`` draws."""
        have = self.count()
        if have < count:
            raise ValueError(
                f"{self.path} holds {have} draws but the chain's checkpoint counts {count}; the "
                "run folder is damaged (start the run again with overwrite=True)"
            )
        os.truncate(self.path, self.header_bytes + count * self.record.itemsize)

    def blocks(self, stop: int) -> Any:
        """``(start, stop, arrays)`` for draws ``0..stop-1`` in blocks of about 4 MiB.

        ``arrays`` maps group -> encoded name -> values of shape ``(block, ...)``.
        """
        step = max(1, _READ_BYTES // max(1, self.record.itemsize))
        with open(self.path, "rb") as handle:
            for start in range(0, stop, step):
                n = min(step, stop - start)
                handle.seek(self.header_bytes + start * self.record.itemsize)
                data = np.fromfile(handle, dtype=self.record, count=n)
                if len(data) < n:
                    raise ValueError(f"{self.path} ends before draw {start + len(data)}")
                yield start, start + n, self._arrays(data)

    def _arrays(self, data: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
        out: dict[str, dict[str, np.ndarray]] = {}
        for group, name, _, dtype, _ in self.variables:
            values = data[f"{group}/{name}"]  # a view into the block, copied only by its reader
            out.setdefault(group, {})[name] = (
                values if values.dtype == dtype else values.astype(dtype)
            )
        return out


def _encoded(record: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """One draw as :func:`bayesflat.trace.schema.draw_variables` stores it: encoded names,
    ``(dims, values)`` with values of shape ``(1, 1, ...)``."""
    out = {}
    for group in schema.DRAW_GROUPS:
        variables = record.get(group)
        if variables:
            data = {k: np.asarray(v)[None, None] for k, v in variables.items()}
            out[group] = schema.draw_variables(group, data, (1, 1))
    return out


class FolderSink:
    """Writes every chain's draws into a run folder as they are kept.

    Each draw is encoded at once into the chain's buffer of 1 MiB of records, which is
    appended to the chain's :class:`DrawFile` when full and at every :meth:`flush` (the run
    engine flushes before every checkpoint), so at most 1 MiB of draws per chain is ever held
    in memory.
    """

    def __init__(
        self, folder: RunFolder, chains: int, draws: int, coords: Mapping[str, Any]
    ) -> None:
        self.folder = folder
        self.chains, self.draws = chains, draws
        self.coords = dict(coords)
        self._files: dict[int, DrawFile | None] = {}
        self._buffers: dict[int, np.ndarray] = {}
        self._waiting: dict[int, int] = {}
        self._kept: dict[int, int] = {}

    def begin(self, chain: int, kept: int) -> None:
        """Start (or continue) ``chain`` at draw ``kept``: draws beyond it are cut off."""
        self.folder.chain_dir(chain).mkdir(parents=True, exist_ok=True)
        path = self.folder.draws_path(chain)
        draws: DrawFile | None = None
        if kept == 0:
            path.unlink(missing_ok=True)
        elif not path.is_file():
            raise ValueError(
                f"{path} is missing but the chain's checkpoint counts {kept} draws; the run "
                "folder is damaged (start the run again with overwrite=True)"
            )
        else:
            draws = DrawFile(path)
            draws.truncate(kept)
        self._files[chain] = draws
        self._buffers.pop(chain, None)
        self._waiting[chain] = 0
        self._kept[chain] = kept

    def write(self, chain: int, draw: int, record: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        """Add one draw (``draw`` must follow the previous one)."""
        expected = self._kept[chain]
        if draw != expected:
            raise ValueError(f"chain {chain}: draw {draw} written where draw {expected} was due")
        draws = self._files[chain]
        if draws is None:
            draws = self._files[chain] = DrawFile.create(
                self.folder.draws_path(chain), chain, record
            )
        buffer = self._buffers.get(chain)
        if buffer is None:
            size = max(1, _APPEND_BYTES // max(1, draws.record.itemsize))
            buffer = self._buffers[chain] = np.empty(size, draws.record)
        waiting = self._waiting[chain]
        draws.encode(record, buffer[waiting : waiting + 1])
        self._waiting[chain] = waiting + 1
        self._kept[chain] = draw + 1
        if waiting + 1 == len(buffer):
            self.flush(chain)

    def pending_bytes(self, chain: int) -> int:
        """Bytes of ``chain`` not yet handed to the file (at most 1 MiB or one draw)."""
        buffer = self._buffers.get(chain)
        return 0 if buffer is None else self._waiting[chain] * buffer.itemsize

    def kept(self, chain: int) -> int:
        """Draws of ``chain`` written (appended or waiting)."""
        return self._kept.get(chain, 0)

    def flush(self, chain: int) -> None:
        """Append the waiting draws of ``chain`` to its file."""
        waiting = self._waiting.get(chain, 0)
        if not waiting:
            return
        draws = self._files[chain]
        assert draws is not None
        with open(draws.path, "ab") as handle:
            handle.write(self._buffers[chain][:waiting].data)
        self._waiting[chain] = 0

    def finish(self, static: Static, *, complete: bool, reason: str = "") -> Any:
        """Assemble ``trace.nc`` from the draw files (complete runs) and return the trace."""
        for chain in list(self._waiting):
            self.flush(chain)
        kept = [self.kept(c) for c in range(self.chains)]
        if complete:
            return assemble_trace(self.folder, static, kept)
        return _partial_trace(self.folder, static, kept, reason)


def _draw_files(folder: RunFolder, kept: Sequence[int]) -> list[DrawFile | None]:
    files = []
    for chain, count in enumerate(kept):
        path = folder.draws_path(chain)
        files.append(DrawFile(path) if count and path.is_file() else None)
    return files


def _pieces(files: Sequence[DrawFile | None], kept: Sequence[int]) -> list[Any]:
    return [
        draws.blocks(count) if draws is not None else ()
        for draws, count in zip(files, kept, strict=True)
    ]


def assemble_trace(folder: RunFolder, static: Static, kept: Sequence[int]) -> Any:
    """Write the folder's ``trace.nc`` from its draw files, then remove the draw files.

    Returns the trace of ``trace.nc``, its arrays read from the file when they are used.
    """
    from bayesflat.trace.build import assemble, static_groups
    from bayesflat.trace.io import write_concatenated

    root = static.run_attrs(kept, complete=True, reason="")
    settings, kinds = schema.encode_attrs(root)
    stamp = schema.provenance()
    encoded = {**stamp, **settings, schema.KINDS_KEY: json.dumps(kinds, sort_keys=True)}
    files = _draw_files(folder, kept)
    first = next((f for f in files if f is not None), None)
    if first is None:
        raise ValueError(f"no chain of the run in {folder.path} kept a draw")
    layout: dict[str, dict[str, tuple[tuple[str, ...], Any]]] = {}
    sizes: dict[str, int] = {}
    for group, name, dims, dtype, shape in first.variables:
        layout.setdefault(group, {})[name] = (("chain", "draw", *dims), dtype)
        sizes.update(zip(dims, shape, strict=True))
    parts, stored_root = write_concatenated(
        folder.trace_nc,
        layout=layout,
        sizes=sizes,
        pieces=_pieces(files, kept),
        draws=max(kept),
        static=static_groups(static.observed_data, static.constant_data),
        root=encoded,
        coords=static.coords,
        group_attrs={
            g: {**stamp, **settings} if g == "posterior" else stamp for g in schema.DRAW_GROUPS
        },
    )
    for chain in range(len(kept)):
        folder.draws_path(chain).unlink(missing_ok=True)
    return assemble(parts, stored_root)


def _partial_trace(folder: RunFolder, static: Static, kept: Sequence[int], reason: str) -> Any:
    sink = MemorySink(len(kept), max(1, max(kept, default=0)))
    for chain, blocks in enumerate(_pieces(_draw_files(folder, kept), kept)):
        sink.begin(chain, 0)
        for start, stop, arrays in blocks:
            for i in range(stop - start):
                record = {
                    g: {schema.decode_name(v): a[i] for v, a in vs.items()}
                    for g, vs in arrays.items()
                }
                sink.write(chain, start + i, record)
    return sink.finish(static, complete=False, reason=reason)


def load_folder(path: str | os.PathLike[str], *, lazy: bool = False) -> Any:
    """The trace of a run folder: its ``trace.nc``, or the draws kept so far."""
    from bayesflat.trace.build import assemble
    from bayesflat.trace.io import open_groups

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
