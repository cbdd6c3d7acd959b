"""Traces: the ArviZ schema as xarray objects, saved as netCDF.

A trace holds the draws of a run and what was computed from them:

========================  =====================================================
group                     variables and dimensions
========================  =====================================================
``posterior``             one variable per ``state_dict`` key,
                          ``(chain, draw, <key>_dim_0, ...)``, float32
``sample_stats``          ``lp``, ``step_size``, ``temperature``, ``sigma``,
                          ``grad_norm`` and sampler extras, ``(chain, draw, ...)``
``predictions``           class probabilities per evaluation set,
                          ``(chain, draw, <set>_id, class)``, float32
``log_likelihood``        pointwise ``log p(y_i | x_i, theta)`` per evaluation set,
                          ``(chain, draw, <set>_id)``, float64
``observed_data``         integer labels per evaluation set, ``(<set>_id,)``
``constant_data``         anything constant (set names, class labels)
========================  =====================================================

Every dimension has the integer coordinate ``0..size-1``. The root attributes
hold the provenance (``created_by="bayesflat"``, versions, ``created_at``) and
the run settings; both are repeated in ``posterior.attrs`` so that ArviZ shows
them.

Every group is built here as an :class:`xarray.Dataset`; the user gets what
their ArviZ reads: :class:`arviz.InferenceData` on ArviZ 0.x, an
:class:`xarray.DataTree` with the same groups on ArviZ >= 1.0.

Variable names are the ``state_dict`` keys and evaluation-set names as given
(dots are safe in netCDF/HDF5 and in ArviZ). The one unsafe character, ``/``
(HDF5's group separator), is written ``%2F``, and ``%`` is written ``%25`` so
that the mapping is reversible: see :func:`encode_name` and :func:`decode_name`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib.metadata import version as _distribution_version
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import h5netcdf
import numpy as np
import xarray as xr

from . import __version__

if TYPE_CHECKING:
    from arviz import InferenceData

    Trace = InferenceData | xr.DataTree

__all__ = [
    "GROUPS",
    "PROVENANCE_KEYS",
    "build_trace",
    "decode_name",
    "encode_name",
    "get_group",
    "groups",
    "load",
    "save",
    "trace_attrs",
]

GROUPS = (
    "posterior",
    "sample_stats",
    "predictions",
    "log_likelihood",
    "observed_data",
    "constant_data",
)
"""The groups a trace may hold, in the order they are stored."""

PROVENANCE_KEYS = (
    "created_by",
    "bayesflat_version",
    "arviz_version",
    "created_at",
    "inference_library",
)
"""Root attributes that :func:`build_trace` always writes; ``attrs`` may not set them."""

# JSON map {attribute: kind} for the attributes whose stored form is not their value.
_KINDS_KEY = "bayesflat_attr_kinds"
_INT64 = np.iinfo(np.int64)
_SAVED_BY = "a bayesflat trace written by bayesflat.trace.save"


def encode_name(key: str) -> str:
    """Map a ``state_dict`` key or set name to its variable name in the trace.

    ``%`` becomes ``%25`` and ``/`` becomes ``%2F``; every other character,
    dots included, is kept. ``decode_name(encode_name(key)) == key``.

    Parameters
    ----------
    key : str
        Non-empty name other than ``"."``.

    Returns
    -------
    str
        The name as stored (identical to ``key`` unless it holds ``/`` or ``%``).
    """
    if not isinstance(key, str):
        raise TypeError(f"names must be str, got {type(key).__name__} {key!r}")
    if key in ("", "."):
        raise ValueError(f"{key!r} cannot be a variable name in a netCDF file; rename it")
    return key.replace("%", "%25").replace("/", "%2F")


def decode_name(name: str) -> str:
    """Invert :func:`encode_name`: the ``state_dict`` key or set name of a variable.

    Parameters
    ----------
    name : str
        A variable name of a trace.

    Returns
    -------
    str
        The original key.
    """
    return unquote(name)


def build_trace(
    *,
    posterior: Mapping[str, Any],
    sample_stats: Mapping[str, Any],
    predictions: Mapping[str, Any] | None = None,
    log_likelihood: Mapping[str, Any] | None = None,
    observed_data: Mapping[str, Any] | None = None,
    constant_data: Mapping[str, Any] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> Trace:
    """Build a trace from arrays of draws.

    Arrays may be numpy arrays, anything :func:`numpy.asarray` accepts, or CPU/GPU
    torch tensors (detached and copied to the host here). All draw arrays share
    the leading ``(chain, draw)`` shape of the posterior.

    Parameters
    ----------
    posterior : mapping of str to array, shape (chain, draw, *param_shape)
        Draws per ``state_dict`` key. Variable ``key`` gets dimensions
        ``(chain, draw, f"{key}_dim_0", ...)``. Floating arrays are stored as
        float32; integer and bool arrays (buffers such as
        ``num_batches_tracked``) as int64 and bool.
    sample_stats : mapping of str to array, shape (chain, draw, *extra)
        Per-draw statistics: ``lp`` (minibatch potential in mean-loss units),
        ``step_size``, ``temperature``, ``sigma``, ``grad_norm``, sampler extras.
        Floating arrays are stored as float64, integer as int64, bool as bool.
        May be empty.
    predictions : mapping of str to array, shape (chain, draw, n, n_class), optional
        Class probabilities per evaluation set; dimensions
        ``(chain, draw, f"{set}_id", "class")``; stored as float32. All sets share
        ``class``, so they have the same number of classes.
    log_likelihood : mapping of str to array, shape (chain, draw, n), optional
        Pointwise log-likelihood ``log p(y_i | x_i, theta)`` (nats) of the labels of
        each evaluation set, dimensions ``(chain, draw, f"{set}_id")``; stored as
        float64. ``az.loo`` and ``az.waic`` read it (with one set, no arguments).
    observed_data : mapping of str to int array, shape (n,), optional
        Labels per evaluation set, dimension ``f"{set}_id"``; stored as int64,
        in ``[0, n_class)`` where the set has predictions.
    constant_data : mapping of str to array, optional
        Anything constant; variable ``name`` gets dimensions ``f"{name}_dim_{i}"``.
        Dtypes are kept (object arrays become str).
    attrs : mapping of str to value, optional
        Flat run settings: sampler name, every hyperparameter, ``num_data``,
        ``temperature``, ``seed``, ``chains``... Values may be str, int, float,
        bool, None, list, tuple or dict (numpy scalars and arrays too). They are
        stored netCDF-safe: bool as 0/1, None as ``"None"``, ints beyond int64 as
        str, lists of two or more numbers as arrays, other lists and dicts as JSON
        strings. :func:`trace_attrs` decodes them (tuples come back as lists).
        Keys may not start with ``_``, be ``"coordinates"`` (netCDF gives both
        a meaning), or be one of :data:`PROVENANCE_KEYS`.

    Returns
    -------
    arviz.InferenceData or xarray.DataTree
        ``InferenceData`` on ArviZ 0.x, a ``DataTree`` with the same groups on
        ArviZ >= 1.0. Groups that would be empty are left out.

    Raises
    ------
    ValueError
        On a shape that does not fit the schema (the message names the group and
        the variable), an evaluation set whose size differs between groups,
        labels out of range, or a name collision.
    TypeError
        On a name that is not str, an array of unsupported dtype, or an attribute
        value that cannot be stored.
    """
    if not posterior and not sample_stats:
        raise ValueError(
            "posterior and sample_stats are both empty: a trace needs at least one variable "
            "of shape (chain, draw, ...)"
        )
    chain_draw = _chain_draw(posterior) if posterior else _chain_draw(sample_stats, "sample_stats")
    stamp = _provenance()
    settings, kinds = _encode_attrs(attrs or {})

    draws = {
        "posterior": _draw_vars("posterior", posterior, chain_draw, np.float32),
        "sample_stats": _draw_vars("sample_stats", sample_stats, chain_draw, np.float64),
        "predictions": _draw_vars("predictions", predictions, chain_draw, np.float32, ("class",)),
        "log_likelihood": _draw_vars("log_likelihood", log_likelihood, chain_draw, np.float64, ()),
    }
    n_class = _check_sets(draws["predictions"], draws["log_likelihood"])
    labels = _labels(observed_data or {}, draws["predictions"], draws["log_likelihood"], n_class)
    constants = {}
    for key, value in (constant_data or {}).items():
        name = encode_name(key)
        array = _to_numpy(value)
        if array.dtype == object:
            array = array.astype(str)
        constants[name] = (tuple(f"{name}_dim_{i}" for i in range(array.ndim)), array)

    variables = {**draws, "observed_data": labels, "constant_data": constants}
    parts = {}
    for group in GROUPS:
        if variables[group]:
            group_attrs = {**stamp, **settings} if group == "posterior" else dict(stamp)
            parts[group] = _dataset(group, variables[group], group_attrs)
    root = {**stamp, **settings, _KINDS_KEY: json.dumps(kinds, sort_keys=True)}
    return _assemble(parts, root)


def save(trace: Trace, path: str | os.PathLike[str]) -> Path:
    """Write a trace to a netCDF4 file, atomically.

    The groups are written with h5netcdf into a temporary file in the destination
    folder, which then replaces ``path`` (:func:`os.replace`); if writing fails,
    the temporary file is removed and an existing ``path`` is left as it was.
    ``az.from_netcdf`` reads the file on ArviZ 0.x; :func:`load` reads it on any
    ArviZ.

    Parameters
    ----------
    trace : arviz.InferenceData or xarray.DataTree
        A trace made by :func:`build_trace` or :func:`load`.
    path : str or path-like
        Destination file; missing parent folders are created.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        If ``trace`` was not made by bayesflat (root attribute ``created_by``).
    """
    path = Path(path)
    parts = groups(trace)
    root = _root_attrs(trace)
    if root.get("created_by") != "bayesflat":
        raise ValueError(
            f"cannot save to {path}: the trace's root attribute created_by is "
            f"{root.get('created_by')!r}, expected 'bayesflat' (build it with build_trace)"
        )
    if path.is_dir():
        raise ValueError(f"path {path} is a folder; give a file name such as {path / 'trace.nc'}")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        xr.Dataset(attrs=root).to_netcdf(temporary, mode="w", engine="h5netcdf")
        for name, dataset in parts.items():
            dataset.to_netcdf(temporary, mode="a", group=name, engine="h5netcdf")
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    return path


def load(path: str | os.PathLike[str]) -> Trace:
    """Read a trace written by :func:`save`.

    Every group is loaded into memory and the file closed, so it can be
    overwritten or deleted at once.

    Parameters
    ----------
    path : str or path-like
        A file written by :func:`save`.

    Returns
    -------
    arviz.InferenceData or xarray.DataTree
        The type :func:`build_trace` returns under the installed ArviZ, equal
        (values, dtypes, dimensions, coordinates, attributes) to what was saved.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If ``path`` is not a netCDF4/HDF5 file, or is one without the root
        attribute ``created_by == "bayesflat"``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected {_SAVED_BY}")
    if not path.is_file():
        raise ValueError(f"{path} is not a file; expected {_SAVED_BY}")
    try:
        with h5netcdf.File(path, "r") as handle:
            names = list(handle.groups)
            created_by = handle.attrs.get("created_by")
    except OSError as err:
        raise ValueError(
            f"{path} is not a netCDF4/HDF5 file ({err}); expected {_SAVED_BY}"
        ) from err
    if created_by != "bayesflat":
        raise ValueError(
            f"{path} is a netCDF/HDF5 file but not a bayesflat trace: its root attribute "
            f"created_by is {created_by!r}, expected 'bayesflat'"
        )
    with xr.open_dataset(path, engine="h5netcdf") as root_dataset:
        root = dict(root_dataset.attrs)
    parts = {}
    order = {group: i for i, group in enumerate(GROUPS)}
    for name in sorted(names, key=lambda group: (order.get(group, len(GROUPS)), group)):
        with xr.open_dataset(path, group=name, engine="h5netcdf") as dataset:
            dataset.load()
        # What the file said about storage is not part of the trace's value.
        dataset.encoding = {}
        for variable in dataset.variables.values():
            variable.encoding = {}
        parts[name] = dataset
    return _assemble(parts, root)


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


def get_group(trace: Trace, name: str) -> xr.Dataset | None:
    """One group of a trace, or None if the trace does not hold it.

    Parameters
    ----------
    trace : arviz.InferenceData or xarray.DataTree
    name : str
        Group name, e.g. ``"predictions"``.

    Returns
    -------
    xarray.Dataset or None
    """
    return groups(trace).get(name)


def trace_attrs(trace: Trace) -> dict[str, Any]:
    """The root attributes of a trace, decoded to Python values.

    Provenance (:data:`PROVENANCE_KEYS`) and run settings, as given to
    :func:`build_trace` (tuples as lists, dict keys as JSON strings).

    Parameters
    ----------
    trace : arviz.InferenceData or xarray.DataTree

    Returns
    -------
    dict of str to value
    """
    stored = _root_attrs(trace)
    kinds = json.loads(stored.get(_KINDS_KEY, "{}"))
    decoded = {}
    for key, value in stored.items():
        if key == _KINDS_KEY:
            continue
        kind = kinds.get(key)
        if kind == "bool":
            decoded[key] = bool(value)
        elif kind == "none":
            decoded[key] = None
        elif kind == "int":
            decoded[key] = int(value)
        elif kind == "json":
            decoded[key] = json.loads(value)
        else:
            decoded[key] = value.tolist() if isinstance(value, np.ndarray | np.generic) else value
    return decoded


@functools.cache
def _arviz_major() -> int:
    # Read from the distribution metadata: importing arviz costs a second.
    return int(_distribution_version("arviz").split(".")[0])


def _assemble(parts: dict[str, xr.Dataset], root: dict[str, Any]) -> Trace:
    if _arviz_major() >= 1:
        return xr.DataTree.from_dict({"/": xr.Dataset(attrs=root), **parts})
    from arviz import InferenceData

    return InferenceData(attrs=root, **parts)


def _is_datatree(trace: Any) -> bool:
    datatree = getattr(xr, "DataTree", None)
    return datatree is not None and isinstance(trace, datatree)


def _is_inference_data(trace: Any) -> bool:
    if _arviz_major() >= 1:
        return False
    from arviz import InferenceData

    return isinstance(trace, InferenceData)


def _require_trace(trace: Any) -> None:
    if not (_is_datatree(trace) or _is_inference_data(trace)):
        raise TypeError(
            f"expected arviz.InferenceData or xarray.DataTree, got {type(trace).__name__}"
        )


def _root_attrs(trace: Trace) -> dict[str, Any]:
    _require_trace(trace)
    return dict(trace.attrs)


def _provenance() -> dict[str, str]:
    return {
        "created_by": "bayesflat",
        "bayesflat_version": __version__,
        "arviz_version": _distribution_version("arviz"),
        "created_at": datetime.now(UTC).isoformat(),
        "inference_library": "bayesflat",
    }


def _encode_attrs(attrs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    stored, kinds = {}, {}
    for key, value in attrs.items():
        if not isinstance(key, str):
            raise TypeError(f"attrs keys must be str, got {key!r}; convert it with str()")
        if key in PROVENANCE_KEYS or key == _KINDS_KEY:
            raise ValueError(f"attrs[{key!r}]: bayesflat sets this attribute itself; leave it out")
        if key.startswith("_") or key == "coordinates" or not key:
            raise ValueError(f"attrs[{key!r}]: netCDF reserves this attribute name; rename it")
        if isinstance(value, np.ndarray):
            value = value.tolist()
        elif isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bool):
            stored[key], kinds[key] = int(value), "bool"
        elif value is None:
            stored[key], kinds[key] = "None", "none"
        elif isinstance(value, int):
            if _INT64.min <= value <= _INT64.max:
                stored[key] = value
            else:
                stored[key], kinds[key] = str(value), "int"
        elif isinstance(value, float | str):
            stored[key] = value
        elif isinstance(value, list | tuple | dict):
            stored[key] = _number_array(value)
            if stored[key] is None:
                try:
                    stored[key], kinds[key] = json.dumps(value), "json"
                except TypeError as err:
                    raise TypeError(f"attrs[{key!r}] cannot be stored: {err}") from err
        else:
            raise TypeError(
                f"attrs[{key!r}] is a {type(value).__name__}; expected str, int, float, "
                "bool, None, list, tuple or dict"
            )
    return stored, kinds


def _number_array(value: Any) -> np.ndarray | None:
    # Two or more plain numbers read back as the same array; anything else does not.
    if isinstance(value, dict) or len(value) < 2:
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        return None
    if all(isinstance(v, int) for v in value):
        if not all(_INT64.min <= v <= _INT64.max for v in value):
            return None
        return np.asarray(value, dtype=np.int64)
    return np.asarray(value, dtype=np.float64)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; torch is not imported here
        value = value.detach().cpu()
        if value.is_floating_point() and value.element_size() < 4:
            value = value.float()  # numpy has no bfloat16
        value = value.numpy()
    return np.asarray(value)


def _chain_draw(variables: Mapping[str, Any], group: str = "posterior") -> tuple[int, int]:
    key, value = next(iter(variables.items()))
    shape = np.shape(_to_numpy(value))
    if len(shape) < 2 or 0 in shape[:2]:
        raise ValueError(
            f"{group}[{key!r}] has shape {shape}; expected (chain, draw, ...) "
            "with at least one chain and one draw"
        )
    return shape[0], shape[1]


def _draw_vars(
    group: str,
    data: Mapping[str, Any] | None,
    chain_draw: tuple[int, int],
    float_dtype: type[np.floating],
    per_set: tuple[str, ...] | None = None,
) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    # per_set None: dims (chain, draw, <name>_dim_0, ...), any float/int/bool dtype;
    # otherwise an evaluation set: dims (chain, draw, <name>_id, *per_set), float only.
    variables = {}
    for key, value in (data or {}).items():
        name = encode_name(key)
        array = _to_numpy(value)
        if per_set is not None and array.ndim != 3 + len(per_set):
            layout = ", ".join(("chain", "draw", "n", *("n_class" for _ in per_set)))
            raise ValueError(f"{group}[{key!r}] has shape {array.shape}; expected ({layout})")
        if array.shape[:2] != chain_draw:
            raise ValueError(
                f"{group}[{key!r}] has shape {array.shape}; its (chain, draw) must be "
                f"{chain_draw}, as in the posterior"
            )
        if array.dtype.kind == "f":
            array = array.astype(float_dtype, copy=False)
        elif array.dtype.kind in "iu" and per_set is None:
            array = array.astype(np.int64, copy=False)
        elif array.dtype.kind != "b" or per_set is not None:
            raise TypeError(f"{group}[{key!r}] has dtype {array.dtype}; expected float")
        if per_set is None:
            trailing = tuple(f"{name}_dim_{i}" for i in range(array.ndim - 2))
        else:
            trailing = (f"{name}_id", *per_set)
        variables[name] = (("chain", "draw", *trailing), array)
    return variables


def _check_sets(predictions: dict, log_likelihood: dict) -> int | None:
    n_class = None
    for name, (_, values) in predictions.items():
        if n_class is not None and values.shape[3] != n_class:
            raise ValueError(
                f"predictions[{decode_name(name)!r}] has {values.shape[3]} classes, other "
                f"sets have {n_class}; all sets share the dimension 'class'"
            )
        n_class = values.shape[3]
        if name in log_likelihood and log_likelihood[name][1].shape[2] != values.shape[2]:
            raise ValueError(
                f"log_likelihood[{decode_name(name)!r}] has {log_likelihood[name][1].shape[2]} "
                f"points but predictions[{decode_name(name)!r}] has {values.shape[2]}"
            )
    return n_class


def _labels(
    observed: Mapping[str, Any], predictions: dict, log_likelihood: dict, n_class: int | None
) -> dict[str, tuple[tuple[str, ...], np.ndarray]]:
    variables = {}
    for key, value in observed.items():
        name = encode_name(key)
        labels = _to_numpy(value)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ValueError(
                f"observed_data[{key!r}] has shape {labels.shape} and dtype {labels.dtype}; "
                "expected integer labels of shape (n,)"
            )
        for group, sizes in (("predictions", predictions), ("log_likelihood", log_likelihood)):
            if name in sizes and sizes[name][1].shape[2] != labels.size:
                raise ValueError(
                    f"observed_data[{key!r}] has {labels.size} labels but "
                    f"{group}[{key!r}] has {sizes[name][1].shape[2]} points"
                )
        if labels.size and labels.min() < 0:
            raise ValueError(f"observed_data[{key!r}] has negative labels")
        if name in predictions and labels.size and labels.max() >= n_class:
            raise ValueError(
                f"observed_data[{key!r}] has label {labels.max()} but "
                f"predictions[{key!r}] has {n_class} classes"
            )
        variables[name] = ((f"{name}_id",), labels.astype(np.int64, copy=False))
    return variables


def _dataset(
    group: str, variables: dict[str, tuple[tuple[str, ...], np.ndarray]], attrs: dict[str, Any]
) -> xr.Dataset:
    sizes: dict[str, int] = {}
    for name, (dims, values) in variables.items():
        for dim, size in zip(dims, values.shape, strict=True):
            if sizes.setdefault(dim, size) != size:
                raise ValueError(
                    f"{group}[{decode_name(name)!r}]: dimension {dim!r} has size {size} "
                    f"here and {sizes[dim]} in another variable"
                )
    for name in variables:
        if name in sizes:
            raise ValueError(
                f"{group}[{decode_name(name)!r}]: the name is also a dimension of this group"
            )
    coords = {dim: np.arange(size) for dim, size in sizes.items()}
    return xr.Dataset(variables, coords=coords, attrs=attrs)
