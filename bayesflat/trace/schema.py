"""The one authority on a trace's groups, dimensions, dtypes, names and attributes.

Every writer (the in-memory builder, the run engine's chain files, the assembler of a run
folder) turns arrays into variables through this module, so a trace has the same layout
whichever way it was made.

========================  =====================================================
group                     variables and dimensions
========================  =====================================================
``posterior``             random variables of the target, ``(chain, draw, ...)``:
                          for a network, functionals of the weights (per-tensor
                          norms, random projections); for a Pyro model, its sites
``weights``               stored ``state_dict`` entries of a network,
                          ``(chain, draw, <key>_dim_0, ...)``, float32
``sample_stats``          ``lp``, ``potential``, ``step_size``, ``temperature``,
                          ``sigma``, ``grad_norm`` and sampler extras,
                          ``(chain, draw, ...)``, float64; ``diverging`` bool
``predictions``           class probabilities per evaluation set,
                          ``(chain, draw, <set>_id, class)``, float32 (or float16);
                          ``<set>_logits`` shares ``<set>_id``; a run with
                          ``store_probabilities=False`` (root attribute) stores
                          ``<set>_logits`` alone, on ``<set>_logits_id``; draws of a
                          Pyro model's scalar observed site, ``(chain, draw, <set>_id)``
``log_likelihood``        pointwise ``log p(y_i | x_i, theta)`` of training points,
                          ``(chain, draw, <var>_id)``, float64 (what ``az.loo`` reads)
``heldout_log_likelihood``  the same for labelled evaluation sets, ``(chain, draw,
                          <set>_id)``, float64
``observed_data``         integer labels, ``(<name>_id,)``
``constant_data``         anything constant (set names, indices of subsets)
========================  =====================================================

Dimensions get the integer coordinate ``0..size-1`` unless a writer passes labels (the
``tensor`` dimension of per-tensor functionals is labelled with ``state_dict`` names).

Variable names are ``state_dict`` keys and set names as given (dots are safe in netCDF/HDF5
and in ArviZ). The one unsafe character, ``/`` (HDF5's group separator), is written ``%2F``,
and ``%`` is written ``%25``, so that the mapping is reversible (:func:`encode_name`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from importlib.metadata import version as _distribution_version
from typing import Any
from urllib.parse import unquote

import numpy as np

from bayesflat import __version__

__all__ = [
    "BOOL_STATS",
    "DRAW_GROUPS",
    "GROUPS",
    "KINDS_KEY",
    "NAMED_DIMS",
    "PROVENANCE_KEYS",
    "VariableSpec",
    "check_sets",
    "chain_draw",
    "constant_variables",
    "decode_attrs",
    "decode_name",
    "draw_variables",
    "encode_attrs",
    "encode_name",
    "label_variables",
    "provenance",
    "set_dim",
    "to_numpy",
]

GROUPS = (
    "posterior",
    "weights",
    "sample_stats",
    "predictions",
    "log_likelihood",
    "heldout_log_likelihood",
    "observed_data",
    "constant_data",
)
"""The groups a trace may hold, in the order they are stored."""

DRAW_GROUPS = GROUPS[:6]
"""Groups whose variables have leading ``(chain, draw)`` dimensions."""

PROVENANCE_KEYS = (
    "created_by",
    "bayesflat_version",
    "arviz_version",
    "created_at",
    "inference_library",
)
"""Root attributes that every trace carries and ``attrs`` may not set."""

KINDS_KEY = "bayesflat_attr_kinds"
"""Root attribute: JSON map ``{attribute: kind}`` for attributes stored in another form."""

_INT64 = np.iinfo(np.int64)
_LOGITS = "_logits"
# Per group: float dtype and the layout of the dimensions after (chain, draw):
# None = free (<name>_dim_i), "set" = (<set>_id[, class]).
_RULES: dict[str, tuple[type[np.floating], str | None]] = {
    "posterior": (np.float32, None),
    "weights": (np.float32, None),
    "sample_stats": (np.float64, None),
    "predictions": (np.float32, "set"),
    "log_likelihood": (np.float64, "set"),
    "heldout_log_likelihood": (np.float64, "set"),
}

NAMED_DIMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("posterior", "weight_norm"): ("tensor",),
    ("posterior", "projection"): ("direction",),
}
"""Dimensions (after chain and draw) of the variables the run engine itself records."""

BOOL_STATS = ("diverging",)
"""``sample_stats`` flags stored as bool whatever dtype a writer gives (ArviZ reads them so)."""

VariableSpec = tuple[tuple[str, ...], np.ndarray]
"""A variable as ``(dims, values)``."""


def encode_name(key: str) -> str:
    """Map a ``state_dict`` key or set name to its variable name in the trace.

    ``%`` becomes ``%25`` and ``/`` becomes ``%2F``; every other character, dots included,
    is kept. ``decode_name(encode_name(key)) == key``.

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
    """Invert :func:`encode_name`: the ``state_dict`` key or set name of a variable."""
    return unquote(name)


def set_dim(name: str, names: Mapping[str, Any] | set[str] | list[str]) -> str:
    """The per-example dimension of a per-set variable ``name`` among ``names``.

    ``<set>_logits`` shares ``<set>_id`` with ``<set>`` when both are present; every other
    variable ``v`` has ``v_id``.
    """
    if name.endswith(_LOGITS) and name[: -len(_LOGITS)] in names:
        return f"{name[: -len(_LOGITS)]}_id"
    return f"{name}_id"


def provenance() -> dict[str, str]:
    """The provenance attributes: creator, versions and creation time (UTC, ISO 8601)."""
    return {
        "created_by": "bayesflat",
        "bayesflat_version": __version__,
        "arviz_version": _distribution_version("arviz"),
        "created_at": datetime.now(UTC).isoformat(),
        "inference_library": "bayesflat",
    }


def to_numpy(value: Any) -> np.ndarray:
    """``value`` as a numpy array; torch tensors are detached and copied to the host."""
    if hasattr(value, "detach"):  # a torch tensor; torch is not imported here
        # A copy: a view would follow the tensor's storage if it moved (shared memory).
        value = value.detach().to("cpu", copy=True)
        if value.is_floating_point() and str(value.dtype) not in (
            "torch.float16",
            "torch.float32",
            "torch.float64",
        ):
            value = value.float()  # numpy has no bfloat16 or float8
        value = value.numpy()
    return np.asarray(value)


def chain_draw(variables: Mapping[str, Any], group: str = "posterior") -> tuple[int, int]:
    """The leading ``(chain, draw)`` shape of the first variable of ``group``."""
    key, value = next(iter(variables.items()))
    shape = np.shape(to_numpy(value))
    if len(shape) < 2 or 0 in shape[:2]:
        raise ValueError(
            f"{group}[{key!r}] has shape {shape}; expected (chain, draw, ...) "
            "with at least one chain and one draw"
        )
    return shape[0], shape[1]


def draw_variables(
    group: str, data: Mapping[str, Any] | None, leading: tuple[int, int]
) -> dict[str, VariableSpec]:
    """Variables of a draw group, with their dimensions and stored dtypes.

    Parameters
    ----------
    group : str
        One of :data:`DRAW_GROUPS`.
    data : mapping of str to array
        Arrays of shape ``(chain, draw, ...)``.
    leading : (int, int)
        The ``(chain, draw)`` shape every array must start with.

    Returns
    -------
    dict of str to (dims, values)
        Keyed by encoded name. Floats become the group's float dtype (predictions keep
        float16); integers int64 and bools bool where the group allows them.
    """
    float_dtype, layout = _RULES[group]
    variables: dict[str, VariableSpec] = {}
    names = [encode_name(k) for k in (data or {})]
    for key, value in (data or {}).items():
        name = encode_name(key)
        array = to_numpy(value)
        if layout == "set":
            expected = 4 if group == "predictions" else 3
            # Draws of a Pyro model's scalar observed site are predictions without classes.
            if array.ndim != expected and not (group == "predictions" and array.ndim == 3):
                tail = ", n_class) or (chain, draw, n" if expected == 4 else ""
                raise ValueError(
                    f"{group}[{key!r}] has shape {array.shape}; expected (chain, draw, n{tail})"
                )
        if array.shape[:2] != leading:
            raise ValueError(
                f"{group}[{key!r}] has shape {array.shape}; its (chain, draw) must be "
                f"{leading}, as in the other draw groups"
            )
        if group == "sample_stats" and name in BOOL_STATS and array.dtype.kind == "f":
            array = np.nan_to_num(array) > 0.5  # flags written as 0/1 floats (NaN: not reached)
        if array.dtype.kind == "f":
            keep16 = group == "predictions" and array.dtype == np.float16
            array = array.astype(np.float16 if keep16 else float_dtype, copy=False)
        elif array.dtype.kind in "iu" and layout is None:
            array = array.astype(np.int64, copy=False)
        elif array.dtype.kind != "b" or layout is not None:
            raise TypeError(f"{group}[{key!r}] has dtype {array.dtype}; expected float")
        named = NAMED_DIMS.get((group, name))
        if named is not None and len(named) == array.ndim - 2:
            trailing = named
        elif layout is None:
            trailing = tuple(f"{name}_dim_{i}" for i in range(array.ndim - 2))
        else:
            trailing = (set_dim(name, names), *(("class",) if array.ndim == 4 else ()))
        variables[name] = (("chain", "draw", *trailing), array)
    return variables


def check_sets(predictions: Mapping[str, VariableSpec]) -> int | None:
    """The number of classes shared by every prediction variable (``None`` if none)."""
    n_class = None
    for name, (dims, values) in predictions.items():
        if "class" not in dims:
            continue
        if n_class is not None and values.shape[3] != n_class:
            raise ValueError(
                f"predictions[{decode_name(name)!r}] has {values.shape[3]} classes, other "
                f"sets have {n_class}; all sets share the dimension 'class'"
            )
        n_class = values.shape[3]
    return n_class


def label_variables(
    observed: Mapping[str, Any], n_class: int | None, draw_groups: Mapping[str, dict]
) -> dict[str, VariableSpec]:
    """``observed_data`` variables: integer labels of shape ``(n,)``, dimension ``<name>_id``.

    Labels must be non-negative, below ``n_class`` when predictions exist, and match the size
    of ``<name>_id`` wherever a draw group uses that dimension.
    """
    sizes: dict[str, int] = {}
    for variables in draw_groups.values():
        for dims, values in variables.values():
            for dim, size in zip(dims, values.shape, strict=True):
                sizes.setdefault(dim, size)
    out: dict[str, VariableSpec] = {}
    for key, value in observed.items():
        name = encode_name(key)
        labels = to_numpy(value)
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ValueError(
                f"observed_data[{key!r}] has shape {labels.shape} and dtype {labels.dtype}; "
                "expected integer labels of shape (n,)"
            )
        dim = f"{name}_id"
        if dim in sizes and sizes[dim] != labels.size:
            raise ValueError(
                f"observed_data[{key!r}] has {labels.size} labels but the draw groups have "
                f"{sizes[dim]} points along {dim!r}"
            )
        if labels.size and labels.min() < 0:
            raise ValueError(f"observed_data[{key!r}] has negative labels")
        if n_class is not None and labels.size and labels.max() >= n_class:
            raise ValueError(
                f"observed_data[{key!r}] has label {labels.max()} but the predictions have "
                f"{n_class} classes"
            )
        out[name] = ((dim,), labels.astype(np.int64, copy=False))
    return out


def constant_variables(constant: Mapping[str, Any]) -> dict[str, VariableSpec]:
    """``constant_data`` variables: any array, dimensions ``<name>_dim_i``, object as str."""
    out: dict[str, VariableSpec] = {}
    for key, value in constant.items():
        name = encode_name(key)
        array = to_numpy(value)
        if array.dtype == object:
            array = array.astype(str)
        out[name] = (tuple(f"{name}_dim_{i}" for i in range(array.ndim)), array)
    return out


def encode_attrs(attrs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Run settings in a netCDF-safe form, and the kinds needed to decode them.

    bool becomes 0/1, None ``"None"``, ints beyond int64 str, lists of two or more numbers
    arrays, other lists and dicts JSON strings. :func:`decode_attrs` inverts it.
    """
    stored, kinds = {}, {}
    for key, value in attrs.items():
        if not isinstance(key, str):
            raise TypeError(f"attrs keys must be str, got {key!r}; convert it with str()")
        if key in PROVENANCE_KEYS or key == KINDS_KEY:
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


def decode_attrs(stored: Mapping[str, Any]) -> dict[str, Any]:
    """Root attributes as Python values (inverse of :func:`encode_attrs`)."""
    kinds = json.loads(stored.get(KINDS_KEY, "{}"))
    decoded = {}
    for key, value in stored.items():
        if key == KINDS_KEY:
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
