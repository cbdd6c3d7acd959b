"""Saving and loading traces as netCDF4 (HDF5) files, and writing one from many pieces.

A trace file holds one netCDF group per trace group and the run settings as root attributes;
``az.from_netcdf`` reads it on ArviZ 0.x and :func:`load` on any ArviZ. Files are written to a
temporary name in the destination folder and published with :func:`os.replace`, so a reader
never sees a half-written file and a failed write leaves the old one intact.

:func:`write_concatenated` writes a trace whose draw groups are the concatenation of many
pieces (the chain files of a run) one piece at a time, so its memory does not grow with the
number of draws.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5netcdf
import h5netcdf.attrs
import h5py
import numpy as np
import xarray as xr
from xarray.backends import BackendArray
from xarray.conventions import decode_cf_variable
from xarray.core import indexing

from bayesflat import _io
from bayesflat.trace import schema
from bayesflat.trace.build import assemble, groups, root_attrs

if TYPE_CHECKING:
    from bayesflat.trace.build import Trace

__all__ = ["load", "open_groups", "save", "write_concatenated", "write_groups"]

_SAVED_BY = "a bayesflat trace written by bayesflat.save, or a run folder"


def save(trace: Trace, path: str | os.PathLike[str]) -> Path:
    """Write a trace to a netCDF4 file, atomically.

    Parameters
    ----------
    trace : arviz.InferenceData or xarray.DataTree
        A trace made by bayesflat (root attribute ``created_by == "bayesflat"``).
    path : str or path-like
        Destination file; missing parent folders are created.

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    ValueError
        If ``trace`` was not made by bayesflat or ``path`` is a folder.
    """
    path = Path(path)
    root = root_attrs(trace)
    if root.get("created_by") != "bayesflat":
        raise ValueError(
            f"cannot save to {path}: the trace's root attribute created_by is "
            f"{root.get('created_by')!r}, expected 'bayesflat' (build it with build_trace)"
        )
    write_groups(path, groups(trace), root)
    return path


def write_groups(path: str | os.PathLike[str], parts: Mapping[str, xr.Dataset], root: dict) -> Path:
    """Write group datasets and root attributes as one netCDF4 file, atomically."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path {path} is a folder; give a file name such as {path / 'trace.nc'}")
    with _io.atomic_path(path) as temporary:
        xr.Dataset(attrs=root).to_netcdf(temporary, mode="w", engine="h5netcdf")
        for name, data in parts.items():
            data.to_netcdf(temporary, mode="a", group=name, engine="h5netcdf")
    return path


def load(path: str | os.PathLike[str], *, lazy: bool = False) -> Trace:
    """Read a trace file written by :func:`save`, or the trace of a run folder.

    Parameters
    ----------
    path : str or path-like
        A trace file, or a run folder written by ``bayesflat.sample(..., output=...)`` or
        ``bayesflat run`` (its ``trace.nc`` when the run finished; otherwise the draws its
        chains kept so far, NaN-padded, with ``complete = False``).
    lazy : bool, default False
        Keep the file open and read arrays only when they are used (for traces larger than
        memory). The default reads everything and closes the file, so it can be overwritten
        or deleted at once.

    Returns
    -------
    arviz.InferenceData or xarray.DataTree
        Equal (values, dtypes, dimensions, coordinates, attributes) to what was saved.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If ``path`` is neither a bayesflat trace nor a run folder.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected {_SAVED_BY}")
    if path.is_dir():
        from bayesflat.run.sinks import load_folder

        return load_folder(path, lazy=lazy)
    parts, root = open_groups(path, lazy=lazy)
    return assemble(parts, root)


def open_groups(path: Path, *, lazy: bool = False) -> tuple[dict[str, xr.Dataset], dict]:
    """The groups (in schema order) and root attributes of a bayesflat netCDF file.

    Groups are read with h5py (:func:`_read_group`): the same datasets xarray's h5netcdf
    backend and CF decoding give, without the milliseconds of netCDF bookkeeping xarray spends
    on every variable (about 0.3 s for the groups of a default run's trace). A group whose
    structure needs xarray's backend (nested groups, dimensions of a parent group, unlabelled
    axes, fixed-length strings, compound types, a ``coordinates`` attribute) is opened by
    xarray. With ``lazy`` the numeric variables are read from the file when used; otherwise
    everything is read and the file closed.
    """
    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(
            f"{path} is not a netCDF4/HDF5 file ({err}); expected {_SAVED_BY}"
        ) from err
    with handle:
        root = _attributes(handle)
        if root.get("created_by") != "bayesflat":
            raise ValueError(
                f"{path} is a netCDF/HDF5 file but not a bayesflat trace: its root attribute "
                f"created_by is {root.get('created_by')!r}, expected 'bayesflat'"
            )
        names = [name for name, node in handle.items() if isinstance(node, h5py.Group)]
        stored = _StoredFile(path) if lazy else None
        read = {name: _read_group(handle[name], stored) for name in names}
    order = {group: i for i, group in enumerate(schema.GROUPS)}
    parts = {}
    for name in sorted(names, key=lambda group: (order.get(group, len(schema.GROUPS)), group)):
        data = read[name]
        if data is None:
            data = _open_with_xarray(path, name, lazy)
        parts[name] = data
    return parts, root


def _open_with_xarray(path: Path, group: str, lazy: bool) -> xr.Dataset:
    """A group opened by xarray's h5netcdf backend, with its CF decoding."""
    data = xr.open_dataset(path, group=group, engine="h5netcdf")
    if lazy:
        return data
    with data:
        data.load()
    # What the file said about storage is not part of the trace's value.
    data.encoding = {}
    for variable in data.variables.values():
        variable.encoding = {}
    return data


_NOT_A_VARIABLE = b"This is a netCDF dimension but not a netCDF variable"
"""The start of the ``NAME`` of a dimension scale that is a dimension without labels."""

_DECODED = frozenset(
    {"_FillValue", "missing_value", "scale_factor", "add_offset", "_Unsigned", "units",
     "calendar", "_Encoding", "dtype"}
)  # fmt: skip
"""Variable attributes that xarray's CF decoding acts on (masks, scales, times, strings,
bools). A variable carrying none, or only a NaN ``_FillValue`` on floats or ``dtype = "bool"``
on integers, decodes to its stored values (bools cast); the others go through
:func:`xarray.conventions.decode_cf_variable`."""


def _read_group(node: h5py.Group, stored: _StoredFile | None) -> xr.Dataset | None:
    """One netCDF group as xarray's h5netcdf backend and CF decoding give it, or None.

    Handled: dimension scales (labelled or not), numbers, variable-length strings and
    attributes, each variable decoded as :data:`_DECODED` says. Any other structure gives
    None, and the caller opens the group with xarray. With ``stored``, numeric variables other
    than dimension labels are read from the file when used.
    """
    attrs = _attributes(node)
    if "coordinates" in attrs:
        return None
    variables: dict[str, xr.Variable] = {}
    for name, item in node.items():
        if (
            not isinstance(item, h5py.Dataset)
            or name.startswith("_nc4_non_coord_")
            or "coordinates" in item.attrs
        ):
            return None
        scale = item.attrs.get("CLASS") == b"DIMENSION_SCALE"
        if scale and _NOT_A_VARIABLE in bytes(item.attrs.get("NAME", b"")):
            continue  # a dimension without labels
        if scale:
            dims: tuple[str, ...] | None = (name,) if item.ndim == 1 else None
        else:
            dims = _dimensions(node, item)
        variable = None if dims is None else _read_variable(item, dims, None if scale else stored)
        if variable is None:
            return None
        variables[name] = variable
    coords = {name: v for name, v in variables.items() if v.dims == (name,)}
    data_vars = {name: v for name, v in variables.items() if name not in coords}
    return (
        stored.dataset(data_vars, coords, attrs)
        if stored is not None
        else xr.Dataset(data_vars, coords=coords, attrs=attrs)
    )


def _dimensions(node: h5py.Group, item: h5py.Dataset) -> tuple[str, ...] | None:
    """A variable's dimension names from its dimension-scale links (the last scale of each
    axis, as netCDF reads them); None if an axis has none or one outside ``node``."""
    if item.ndim == 0:
        return ()
    links = item.attrs.get("DIMENSION_LIST")
    if links is None or len(links) != item.ndim:
        return None
    names = []
    for refs in links:
        if len(refs) == 0:
            return None
        scale = node.file[refs[-1]].name
        parent, _, dim = scale.rpartition("/")
        if parent != node.name:
            return None
        names.append(dim)
    return tuple(names)


def _read_variable(
    item: h5py.Dataset, dims: tuple[str, ...], stored: _StoredFile | None
) -> xr.Variable | None:
    """One stored variable decoded as xarray decodes it, or None if that needs xarray's
    backend (fixed-length strings, compound or enumerated types, a null dataspace)."""
    attrs = _attributes(item)
    dtype = item.dtype
    if item.shape is None:
        return None
    string = h5py.check_string_dtype(dtype)
    if string is not None:
        if string.length is not None:
            return None
        # As h5netcdf reads them; the decoding turns them into str arrays where xarray does.
        values = np.asarray(item.asstr()[()], dtype=object)
        return _decoded(item, xr.Variable(dims, values, attrs, encoding={"dtype": str}), True)
    if dtype.kind not in "biuf":
        return None
    fill = np.asarray(attrs.get("_FillValue", np.nan))
    boolean = attrs.get("dtype") == "bool" and dtype.kind in "iu"
    plain = (
        dtype.isnative
        and not _DECODED & (attrs.keys() - {"_FillValue", "dtype"})
        and (
            "_FillValue" not in attrs
            or (dtype.kind == "f" and fill.size == 1 and np.isnan(fill).all())
        )
        and ("dtype" not in attrs or boolean)
    )
    if not plain:
        data = stored.lazy(item.name[1:], item.shape, dtype) if stored is not None else item[()]
        return _decoded(item, xr.Variable(dims, data, attrs), stored is None)
    attrs.pop("_FillValue", None)
    attrs.pop("dtype", None)
    decoded = np.dtype(bool) if boolean else dtype
    if stored is not None:
        return xr.Variable(dims, stored.lazy(item.name[1:], item.shape, decoded), attrs)
    return xr.Variable(dims, item[()].astype(decoded, copy=False), attrs)


def _decoded(item: h5py.Dataset, variable: xr.Variable, load: bool) -> xr.Variable:
    """``variable`` through xarray's CF decoding, read into memory if ``load``."""
    name = item.name.rpartition("/")[2]
    decoded = decode_cf_variable(name, variable)
    decoded.encoding = {}
    return decoded.load() if load else decoded


Arrays = Mapping[str, Mapping[str, np.ndarray]]
"""Draw groups as plain arrays: group -> variable -> values of shape ``(draws, ...)``."""

Layout = Mapping[str, Mapping[str, tuple[tuple[str, ...], Any]]]
"""Draw groups' variables: group -> encoded name -> (dimensions, dtype)."""


def write_concatenated(
    path: str | os.PathLike[str],
    *,
    layout: Layout,
    sizes: Mapping[str, int],
    pieces: Sequence[Iterable[tuple[int, int, Arrays]]],
    draws: int,
    static: Mapping[str, xr.Dataset],
    root: dict[str, Any],
    coords: Mapping[str, Sequence[Any]] | None = None,
    group_attrs: Mapping[str, Mapping[str, Any]] | None = None,
) -> tuple[dict[str, xr.Dataset], dict[str, Any]]:
    """Write a trace whose draw groups are assembled from pieces, one piece in memory at once.

    The file is laid out with h5py in one pass, object for object as xarray's h5netcdf writer
    lays it out (which reopens the file for every group and spends milliseconds on the
    bookkeeping of every variable), then the pieces are copied into its draw variables.

    Parameters
    ----------
    path : path
        Destination file (written atomically).
    layout : mapping
        Every draw variable's dimensions (``chain``, ``draw`` first) and stored dtype, as
        :func:`bayesflat.trace.schema.draw_variables` gives them.
    sizes : mapping of str to int
        Size of every dimension other than ``chain`` and ``draw``.
    pieces : per chain, an iterable of ``(start, stop, arrays)``
        The arrays of draws ``start..stop-1`` of that chain, keyed by group and encoded
        variable name, each of shape ``(stop - start, ...)``; consumed one at a time.
    draws : int
        Length of the ``draw`` dimension; draws no piece covers are NaN.
    static : mapping of str to Dataset
        Groups without draws (``observed_data``, ``constant_data``), written as they are.
    root : dict
        Root attributes (already encoded).
    coords : mapping, optional
        Labels of dimensions that are not ``0..size-1``.
    group_attrs : mapping, optional
        Attributes of each draw group.

    Returns
    -------
    (dict of str to Dataset, dict)
        What :func:`open_groups` with ``lazy=True`` gives for the file: its groups, the draw
        variables read from the file when used, and its root attributes.
    """
    path = Path(path)
    chains = len(pieces)
    labels: dict[str, dict[str, np.ndarray]] = {}
    for group in schema.DRAW_GROUPS:
        if group not in layout:
            continue
        dims = {d for variable_dims, _ in layout[group].values() for d in variable_dims}
        labels[group] = {}
        for dim in sorted(dims):
            if dim == "chain":
                labels[group][dim] = np.arange(chains)
            elif dim == "draw":
                labels[group][dim] = np.arange(draws)
            elif coords and dim in coords:
                labels[group][dim] = np.asarray(coords[dim])
            else:
                labels[group][dim] = np.arange(sizes[dim])
    with _io.atomic_path(path) as temporary:
        with h5netcdf.File(temporary, "w") as out:
            out.attrs.update(root)
        with h5py.File(temporary, "r+") as out:
            ids = itertools.count()
            for group, group_labels in labels.items():
                node = _group(out, group, (group_attrs or {}).get(group, {}))
                for dim, values in group_labels.items():
                    _coordinate(node, dim, values, next(ids))
                for var, (dims, dtype) in layout[group].items():
                    _draw_variable(node, var, dims, dtype)
            for name in schema.GROUPS:
                if name in static:
                    _dataset(_group(out, name, static[name].attrs), static[name], ids)
            for chain, chain_pieces in enumerate(pieces):
                for start, stop, arrays in chain_pieces:
                    for group, variables in arrays.items():
                        for var, values in variables.items():
                            if np.dtype(layout[group][var][1]).kind == "b":
                                values = (np.nan_to_num(values) > 0.5).astype(np.int8)
                            out[group][var][chain, start:stop] = values
    stored = _StoredFile(path)
    parts: dict[str, xr.Dataset] = {}
    with h5py.File(path, "r") as handle:
        file_root = _attributes(handle)
        for name in schema.GROUPS:
            if name in labels:
                variables = {
                    var: xr.Variable(
                        dims,
                        stored.lazy(
                            f"{name}/{var}", tuple(len(labels[name][d]) for d in dims), dtype
                        ),
                    )
                    for var, (dims, dtype) in layout[name].items()
                }
                parts[name] = stored.dataset(variables, labels[name], _attributes(handle[name]))
            elif name in static:
                parts[name] = static[name]
    return parts, file_root


def _group(parent: h5py.Group, name: str, attrs: Mapping[str, Any]) -> h5py.Group:
    """A netCDF group with attributes stored as h5netcdf stores them."""
    node = parent.create_group(name, track_order=True)
    h5netcdf.attrs.Attributes(node.attrs, lambda dtype: None, h5py).update(attrs)
    return node


def _coordinate(node: h5py.Group, dim: str, values: np.ndarray, dimid: int) -> None:
    """The dimension ``dim`` of a netCDF group with its labels, as h5netcdf writes it."""
    string = values.dtype.kind in "UO"
    fill = None if string else _fill(values.dtype)
    scale = node.create_dataset(
        dim,
        data=values.astype(object) if string else values,
        dtype=h5py.string_dtype() if string else values.dtype,
        fillvalue=fill,
        track_order=True,
    )
    scale.make_scale(dim)
    scale.attrs["_Netcdf4Dimid"] = np.int32(dimid)
    scale.attrs["_Netcdf4Coordinates"] = np.array([dimid], np.int32)
    if fill is not None:
        scale.attrs["_FillValue"] = np.array([fill], values.dtype)


def _draw_variable(node: h5py.Group, name: str, dims: tuple[str, ...], dtype: Any) -> None:
    """A netCDF variable over dimensions that ``node`` already holds, made with h5py.

    It is the dataset, dimension-scale links and attributes h5netcdf's ``create_variable``
    writes (``_Netcdf4Coordinates``: the dimension ids; ``_Netcdf4Dimid``: the first one's;
    ``_FillValue``), encoded as xarray encodes it (bools as int8 with ``dtype="bool"``).
    """
    dtype = np.dtype(dtype)
    scales = [node[d] for d in dims]
    shape = tuple(len(scale) for scale in scales)
    boolean = dtype.kind == "b"
    fill = None if boolean else _fill(dtype)
    dataset = node.create_dataset(
        name, shape, dtype=np.int8 if boolean else dtype, fillvalue=fill, track_order=True
    )
    for axis, scale in enumerate(scales):
        dataset.dims[axis].attach_scale(scale)
    ids = [int(scale.attrs["_Netcdf4Dimid"]) for scale in scales]
    dataset.attrs["_Netcdf4Coordinates"] = np.array(ids, np.int32)
    dataset.attrs["_Netcdf4Dimid"] = np.int32(ids[0])
    if fill is not None:
        dataset.attrs["_FillValue"] = np.array([fill], dtype)
    if boolean:
        dataset.attrs["dtype"] = "bool"


def _dataset(node: h5py.Group, data: xr.Dataset, ids: Iterator[int]) -> None:
    """Write ``data`` (a label for every dimension, no encoding) into the group ``node``."""
    for dim in data.sizes:
        _coordinate(node, str(dim), data[dim].values, next(ids))
    for name, variable in data.data_vars.items():
        _draw_variable(node, str(name), tuple(map(str, variable.dims)), variable.dtype)
        values = variable.values
        node[str(name)][...] = values.astype(np.int8) if values.dtype.kind == "b" else values


def _attributes(node: Any) -> dict[str, Any]:
    """A file's or group's attributes as xarray's h5netcdf reader gives them."""
    attributes = h5netcdf.attrs.Attributes(node.attrs, lambda dtype: None, h5py)
    return {
        key: value.decode() if isinstance(value, bytes) else value
        for key, value in attributes.items()
    }


class _StoredFile:
    """A trace file whose variables are read when used, through one h5py handle."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: h5py.File | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_handle": None}  # a copy opens the file itself

    def read(self, name: str, key: tuple[Any, ...]) -> np.ndarray:
        if self._handle is None:
            self._handle = h5py.File(self.path, "r")
        return self._handle[name][key]

    def close(self) -> None:
        """Close the handle; a later read opens the file again."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def dataset(
        self, data_vars: Mapping[str, Any], coords: Mapping[str, Any], attrs: dict
    ) -> xr.Dataset:
        """A dataset of variables read from this file; closing it closes the handle (a later
        read opens the file again)."""
        data = xr.Dataset(data_vars, coords=coords, attrs=attrs)
        data.set_close(self.close)
        return data

    def lazy(self, name: str, shape: tuple[int, ...], dtype: Any) -> Any:
        array = indexing.LazilyIndexedArray(_StoredArray(self, name, shape, np.dtype(dtype)))
        return indexing.MemoryCachedArray(indexing.CopyOnWriteArray(array))


class _StoredArray(BackendArray):
    """One variable of a :class:`_StoredFile` (bools stored as int8, as xarray stores them)."""

    def __init__(self, file: _StoredFile, name: str, shape: tuple[int, ...], dtype: Any) -> None:
        self.file, self.name, self.shape, self.dtype = file, name, shape, dtype

    def __getitem__(self, key: Any) -> Any:
        return indexing.explicit_indexing_adapter(
            key, self.shape, indexing.IndexingSupport.OUTER_1VECTOR, self._read
        )

    def _read(self, key: tuple[Any, ...]) -> np.ndarray:
        return self.file.read(self.name, key).astype(self.dtype, copy=False)


def _fill(dtype: Any) -> Any:
    return np.nan if np.dtype(dtype).kind == "f" else None
