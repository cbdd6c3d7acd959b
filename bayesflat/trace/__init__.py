"""Traces: the ArviZ schema as xarray objects, saved as netCDF.

:mod:`~bayesflat.trace.schema` is the one authority on groups, dimensions, dtypes and names;
:mod:`~bayesflat.trace.build` builds a trace from arrays and reads its groups and attributes;
:mod:`~bayesflat.trace.io` saves and loads trace files and run folders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bayesflat._lazy import lazy_attributes

if TYPE_CHECKING:
    from bayesflat.trace.build import build_trace, draw_chunks, get_group, groups, trace_attrs
    from bayesflat.trace.io import load, save
    from bayesflat.trace.schema import GROUPS, PROVENANCE_KEYS, decode_name, encode_name

__all__ = [
    "GROUPS",
    "PROVENANCE_KEYS",
    "build_trace",
    "decode_name",
    "draw_chunks",
    "encode_name",
    "get_group",
    "groups",
    "load",
    "save",
    "trace_attrs",
]

_MODULES: dict[str, tuple[str, ...]] = {
    "build": ("build_trace", "draw_chunks", "get_group", "groups", "trace_attrs"),
    "io": ("load", "save"),
    "schema": ("GROUPS", "PROVENANCE_KEYS", "decode_name", "encode_name"),
}
"""Submodules and their public names, loaded on first use: ``build`` and ``io`` import xarray,
which a process that only samples and appends draws (``schema``, NumPy only) does not need."""

__getattr__, __dir__ = lazy_attributes(__name__, _MODULES)
