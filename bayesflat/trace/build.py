"""Building a trace from arrays, and reading its groups and attributes.

Every group is built as an :class:`xarray.Dataset`; the user gets what their ArviZ reads:
:class:`arviz.InferenceData` on ArviZ 0.x, an :class:`xarray.DataTree` with the same groups
on ArviZ >= 1.0. The layout is :mod:`bayesflat.trace.schema`'s.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping, Sequence
from importlib.metadata import version as _distribution_version
from typing import TYPE_CHECKING, Any

import numpy as np
import xarray as xr

from bayesflat.trace import schema

if TYPE_CHECKING:
    from arviz import InferenceData

    Trace = InferenceData | xr.DataTree

__all__ = [
    "assemble",
    "build_trace",
    "dataset",
    "draw_chunks",
    "get_group",
    "groups",
    "root_attrs",
    "static_groups",
    "trace_attrs",
]


def build_trace(
    *,
    posterior: Mapping[str, Any] | None = None,
    weights: Mapping[str, Any] | None = None,
    sample_stats: Mapping[str, Any] | None = None,
    predictions: Mapping[str, Any] | None = None,
    log_likelihood: Mapping[str, Any] | None = None,
    heldout_log_likelihood: Mapping[str, Any] | None = None,
    observed_data: Mapping[str, Any] | None = None,
    constant_data: Mapping[str, Any] | None = None,
    coords: Mapping[str, Sequence[Any]] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> Trace:
    """Build a trace from arrays of draws.

    Arrays may be numpy arrays, anything :func:`numpy.asarray` accepts, or CPU/GPU torch
    tensors (detached and copied to the host here). All draw arrays share their leading
    ``(chain, draw)`` shape.

    Parameters
    ----------
    posterior : mapping of str to array, shape (chain, draw, *shape), optional
        Random variables of the target (functionals of a network's weights, or a Pyro
        model's sites). Variable ``key`` gets dimensions ``(chain, draw, key_dim_0, ...)``.
        Floats are stored as float32, integers as int64, bools as bool.
    weights : mapping of str to array, shape (chain, draw, *param_shape), optional
        A network's ``state_dict`` entries per draw, stored like ``posterior``.
    sample_stats : mapping of str to array, shape (chain, draw, *extra), optional
        Per-draw statistics: ``lp`` (log joint density estimate ``-N L_B``, nats),
        ``potential`` (``L_B``, mean-loss units), ``step_size``, ``temperature``, ``sigma``,
        ``grad_norm``, sampler extras. Floats are stored as float64.
    predictions : mapping of str to array, shape (chain, draw, n, n_class), optional
        Class probabilities per evaluation set, dimensions ``(chain, draw, <set>_id,
        class)``; ``<set>_logits`` shares ``<set>_id``. Stored as float32 (float16 kept).
        All sets share ``class``.
    log_likelihood : mapping of str to array, shape (chain, draw, n), optional
        Pointwise ``log p(y_i | x_i, theta)`` (nats) of training points, dimensions
        ``(chain, draw, <name>_id)``, float64: what ``az.loo`` and ``az.waic`` read.
    heldout_log_likelihood : mapping of str to array, shape (chain, draw, n), optional
        The same for labelled evaluation sets.
    observed_data : mapping of str to int array, shape (n,), optional
        Labels, dimension ``<name>_id``; stored as int64, in ``[0, n_class)`` where the
        trace has predictions.
    constant_data : mapping of str to array, optional
        Anything constant; variable ``name`` gets dimensions ``name_dim_i``. Dtypes are kept
        (object arrays become str).
    coords : mapping of str to sequence, optional
        Labels of dimensions (default: ``0..size-1``), e.g. ``{"tensor": names}``.
    attrs : mapping of str to value, optional
        Flat run settings: sampler name, every hyperparameter, ``num_data``, ``temperature``,
        ``seed``... Values may be str, int, float, bool, None, list, tuple or dict (numpy
        scalars and arrays too); :func:`trace_attrs` decodes them (tuples come back as
        lists). Keys may not start with ``_``, be ``"coordinates"``, or be one of
        :data:`~bayesflat.trace.schema.PROVENANCE_KEYS`.

    Returns
    -------
    arviz.InferenceData or xarray.DataTree
        ``InferenceData`` on ArviZ 0.x, a ``DataTree`` with the same groups on ArviZ >= 1.0.
        Groups that would be empty are left out.

    Raises
    ------
    ValueError
        On a shape that does not fit the schema (the message names the group and the
        variable), an evaluation set whose size differs between groups, labels out of range,
        or a name collision.
    TypeError
        On a name that is not str, an array of unsupported dtype, or an attribute value that
        cannot be stored.
    """
    given = {
        "posterior": posterior,
        "weights": weights,
        "sample_stats": sample_stats,
        "predictions": predictions,
        "log_likelihood": log_likelihood,
        "heldout_log_likelihood": heldout_log_likelihood,
    }
    first = next(((g, d) for g, d in given.items() if d), None)
    if first is None:
        raise ValueError(
            "every draw group is empty: a trace needs at least one variable of shape "
            "(chain, draw, ...) in posterior, weights or sample_stats"
        )
    leading = schema.chain_draw(first[1], first[0])
    stamp = schema.provenance()
    settings, kinds = schema.encode_attrs(attrs or {})
    draws = {group: schema.draw_variables(group, data, leading) for group, data in given.items()}
    _check_shared_dims(draws)
    n_class = schema.check_sets(draws["predictions"])
    labels = schema.label_variables(observed_data or {}, n_class, draws)
    constants = schema.constant_variables(constant_data or {})
    variables = {**draws, "observed_data": labels, "constant_data": constants}
    parts = {}
    for group in schema.GROUPS:
        if variables[group]:
            group_attrs = {**stamp, **settings} if group == "posterior" else dict(stamp)
            parts[group] = dataset(group, variables[group], group_attrs, coords)
    root = {**stamp, **settings, schema.KINDS_KEY: json.dumps(kinds, sort_keys=True)}
    return assemble(parts, root)


def _check_shared_dims(draws: Mapping[str, Mapping[str, schema.VariableSpec]]) -> None:
    """A dimension name means the same size in every draw group (``test_id`` in predictions
    and in heldout_log_likelihood, say)."""
    seen: dict[str, tuple[int, str]] = {}
    for group, variables in draws.items():
        for name, (dims, values) in variables.items():
            where = f"{group}[{schema.decode_name(name)!r}]"
            for dim, size in zip(dims[2:], values.shape[2:], strict=True):
                first = seen.setdefault(dim, (size, where))
                if first[0] != size:
                    raise ValueError(
                        f"{where} has {size} points along {dim!r} but {first[1]} has {first[0]}"
                    )


def dataset(
    group: str,
    variables: Mapping[str, schema.VariableSpec],
    attrs: Mapping[str, Any],
    coords: Mapping[str, Sequence[Any]] | None = None,
) -> xr.Dataset:
    """One group as a Dataset with a coordinate for every dimension."""
    sizes: dict[str, int] = {}
    for name, (dims, values) in variables.items():
        for dim, size in zip(dims, values.shape, strict=True):
            if sizes.setdefault(dim, size) != size:
                raise ValueError(
                    f"{group}[{schema.decode_name(name)!r}]: dimension {dim!r} has size {size} "
                    f"here and {sizes[dim]} in another variable"
                )
    for name in variables:
        if name in sizes:
            raise ValueError(
                f"{group}[{schema.decode_name(name)!r}]: the name is also a dimension of this group"
            )
    labels = {}
    for dim, size in sizes.items():
        given = (coords or {}).get(dim)
        if given is not None and len(given) != size:
            raise ValueError(f"coords[{dim!r}] has {len(given)} labels for a size of {size}")
        labels[dim] = np.asarray(given) if given is not None else np.arange(size)
    return xr.Dataset(dict(variables), coords=labels, attrs=dict(attrs))


def static_groups(
    observed_data: Mapping[str, Any] | None, constant_data: Mapping[str, Any] | None
) -> dict[str, xr.Dataset]:
    """The ``observed_data`` and ``constant_data`` groups on their own (non-empty ones)."""
    stamp = schema.provenance()
    variables = {
        "observed_data": schema.label_variables(observed_data or {}, None, {}),
        "constant_data": schema.constant_variables(constant_data or {}),
    }
    return {g: dataset(g, v, stamp) for g, v in variables.items() if v}


def groups(trace: Trace) -> dict[str, xr.Dataset]:
    """Every group of a trace, whichever ArviZ made it.

    Parameters
    ----------
    trace : arviz.InferenceData or xarray.DataTree

    Returns
    -------
    dict of str to xarray.Dataset
        Group name to dataset, in the trace's order.
    """
    _require_trace(trace)
    if _is_datatree(trace):
        return {name: node.to_dataset(inherit=False) for name, node in trace.children.items()}
    return {name: getattr(trace, name) for name in trace.groups()}


CHUNK_BYTES = 8 * 2**20
"""Default size of the slabs :func:`draw_chunks` reads, in bytes of float64 values: large
enough that reading a slab costs little beside computing on it, small enough that the few
working copies made of it stay a few percent of the ~450 MiB a process with torch, ArviZ and
matplotlib loaded starts from."""


def slab_draws(values_per_draw: int, chunk_bytes: int | None = None) -> int:
    """Draws per slab so that a slab of ``values_per_draw`` float64 values per draw fits in
    ``chunk_bytes`` (default :data:`CHUNK_BYTES`, read at call time); at least one."""
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    return max(1, chunk_bytes // max(1, 8 * values_per_draw))


def draw_chunks(
    variable: xr.DataArray, *, chunk_bytes: int | None = None, draws: int | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    r"""Read a ``(chain, draw, ...)`` variable slab by slab along ``draw``.

    Each slab holds every chain and as many consecutive draws as fit in ``chunk_bytes``
    (counted as float64, at least one draw), so memory stays bounded however many draws the
    trace holds: a lazily opened trace (:func:`bayesflat.load` with ``lazy=True``, or the trace
    :func:`bayesflat.sample` returns for a run folder) reads only that slab from the file.

    Parameters
    ----------
    variable : xarray.DataArray
        A variable with ``chain`` and ``draw`` dimensions.
    chunk_bytes : int, optional
        Largest slab, in bytes of float64 values (default :data:`CHUNK_BYTES`).
    draws : int, optional
        Read only the first ``draws`` draws (default all).

    Yields
    ------
    (d0, slab)
        First draw index of the slab and its values, shape ``(chain, d, ...)`` in the stored
        dtype.
    """
    variable = variable.transpose("chain", "draw", ...)
    n_draws = int(variable.sizes["draw"]) if draws is None else int(draws)
    step = slab_draws(int(np.prod([variable.sizes[d] for d in variable.dims if d != "draw"])),
                      chunk_bytes)  # fmt: skip
    for d0 in range(0, n_draws, step):
        yield d0, np.asarray(variable.isel(draw=slice(d0, min(n_draws, d0 + step))).values)


def get_group(trace: Trace, name: str) -> xr.Dataset | None:
    """One group of a trace, or None if the trace does not hold it."""
    return groups(trace).get(name)


def trace_attrs(trace: Trace) -> dict[str, Any]:
    """The root attributes of a trace, decoded to Python values.

    Provenance and run settings as given to :func:`build_trace` (tuples as lists, dict keys
    as JSON strings).
    """
    return schema.decode_attrs(root_attrs(trace))


def root_attrs(trace: Trace) -> dict[str, Any]:
    """The root attributes of a trace as stored."""
    _require_trace(trace)
    return dict(trace.attrs)


@functools.cache
def arviz_major() -> int:
    """Major version of the installed ArviZ (read from metadata: importing it costs a second)."""
    return int(_distribution_version("arviz").split(".")[0])


def assemble(parts: dict[str, xr.Dataset], root: dict[str, Any]) -> Trace:
    """The trace type of the installed ArviZ from group datasets and root attributes."""
    if arviz_major() >= 1:
        return xr.DataTree.from_dict({"/": xr.Dataset(attrs=root), **parts})
    from arviz import InferenceData

    return InferenceData(attrs=root, **parts)


def _is_datatree(trace: Any) -> bool:
    datatree = getattr(xr, "DataTree", None)
    return datatree is not None and isinstance(trace, datatree)


def _is_inference_data(trace: Any) -> bool:
    if arviz_major() >= 1:
        return False
    from arviz import InferenceData

    return isinstance(trace, InferenceData)


def _require_trace(trace: Any) -> None:
    if not (_is_datatree(trace) or _is_inference_data(trace)):
        raise TypeError(
            f"expected arviz.InferenceData or xarray.DataTree, got {type(trace).__name__}"
        )
