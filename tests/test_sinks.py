"""The folder sink: append-only draw files, their survival of a killed writer, the assembly."""

from __future__ import annotations

import tracemalloc

import h5py
import numpy as np
import pytest
import xarray as xr
from test_run import _kwargs, _model, _toy, _zero, assert_same_draws

import bayesflat
from bayesflat import trace as btrace
from bayesflat.run import sinks
from bayesflat.run.sinks import DrawFile, FolderSink, MemorySink, RunFolder, Static
from bayesflat.trace.build import groups, root_attrs


def _record(i: int, n: int = 4096) -> dict[str, dict[str, np.ndarray]]:
    """One draw of about ``4 n`` bytes whose values identify the draw."""
    values = np.arange(n, dtype=np.float32) + 1000 * i
    return {
        "weights": {"w": values.reshape(64, -1)},
        "sample_stats": {"lp": np.float64(-i), "diverging": np.float64(i % 3 == 0)},
        "predictions": {"test": np.full((5, 3), i, dtype=np.float32)},
    }


def _static() -> Static:
    return Static(observed_data={"test": np.arange(5) % 3}, attrs={"sampler": "sgld"})


def _flushed(tmp_path, draws: int) -> RunFolder:
    """A run folder whose one chain has written and flushed ``draws`` records."""
    folder = RunFolder(tmp_path)
    sink = FolderSink(folder, 1, 10, {})
    sink.begin(0, 0)
    for i in range(draws):
        sink.write(0, i, _record(i))
    sink.flush(0)
    return folder


def test_a_record_cut_short_by_a_killed_writer_is_ignored_and_resume_cuts_it(tmp_path):
    folder = _flushed(tmp_path, 6)
    path = folder.draws_path(0)
    draws = DrawFile(path)
    # A writer killed in the middle of draw 6: half of its bytes reached the file.
    with open(path, "ab") as handle:
        handle.write(draws.encode(_record(6))[: draws.record.itemsize // 2])
    assert DrawFile(path).count() == 6
    [(start, stop, arrays)] = DrawFile(path).blocks(6)
    assert (start, stop) == (0, 6)
    np.testing.assert_array_equal(
        arrays["weights"]["w"], np.stack([_record(i)["weights"]["w"] for i in range(6)])
    )
    # The checkpoint counted 4 draws: resuming cuts the file back to exactly 4 records.
    resumed = FolderSink(folder, 1, 10, {})
    resumed.begin(0, 4)
    assert path.stat().st_size == draws.header_bytes + 4 * draws.record.itemsize
    for i in range(4, 10):
        resumed.write(0, i, _record(i))
    straight = MemorySink(1, 10)
    for i in range(10):
        straight.write(0, i, _record(i))
    assert_same_draws(straight.finish(_static(), complete=True),
                      resumed.finish(_static(), complete=True))  # fmt: skip


def test_resume_refuses_a_draw_file_shorter_than_the_checkpoint(tmp_path):
    folder = _flushed(tmp_path, 3)
    with pytest.raises(ValueError, match=r"draws\.bin holds 3 draws but the chain's checkpoint "):
        FolderSink(folder, 1, 10, {}).begin(0, 5)
    folder.draws_path(0).unlink()
    with pytest.raises(ValueError, match=r"draws\.bin is missing but the chain's checkpoint"):
        FolderSink(folder, 1, 10, {}).begin(0, 3)


def test_a_draw_that_changes_its_variables_is_refused(tmp_path):
    sink = FolderSink(RunFolder(tmp_path), 1, 10, {})
    sink.begin(0, 0)
    sink.write(0, 0, _record(0))
    changed = _record(1)
    changed["weights"]["w"] = changed["weights"]["w"][:32]
    with pytest.raises(ValueError, match=r"weights\['w'\] has shape \(32, 64\) at one draw"):
        sink.write(0, 1, changed)
    with pytest.raises(ValueError, match="differs from the earlier draws"):
        sink.write(0, 1, {**_record(1), "posterior": {"extra": np.zeros(2)}})


def test_memory_of_writing_and_assembling_does_not_grow_with_the_draws(tmp_path, monkeypatch):
    """Waiting draws are at most 1 MiB per chain; assembly reads blocks of ``_READ_BYTES``."""
    monkeypatch.setattr(sinks, "_READ_BYTES", 2**20)
    record = _record(0, n=2**15)  # 128 KiB
    size = sum(np.asarray(v).nbytes for g in record.values() for v in g.values())
    peaks = {}
    for draws in (20, 160):
        folder = RunFolder(tmp_path / str(draws))
        sink = FolderSink(folder, 2, draws, {})
        tracemalloc.start()
        for chain in range(2):
            sink.begin(chain, 0)
            for i in range(draws):
                sink.write(chain, i, record)
                assert sink.pending_bytes(chain) <= 2**20 + size
            sink.flush(chain)
        _, writing = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        trace = sink.finish(_static(), complete=True)
        _, assembling = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        peaks[draws] = (writing, assembling)
        assert btrace.trace_attrs(trace)["draws_kept"] == [draws, draws]
        assert groups(trace)["weights"]["w"].shape == (2, draws, 64, 2**9)
    # 8 times the draws (2 x 160 x 128 KiB = 40 MiB written): the same few MiB at any time.
    for stage in (0, 1):
        assert peaks[160][stage] < 4 * 2**20, peaks
        assert peaks[160][stage] < peaks[20][stage] + 2**20, peaks


def test_the_returned_trace_is_the_file_read_back_and_equals_the_memory_run(tmp_path, monkeypatch):
    # Blocks of 3 draws: the assembly crosses block boundaries inside every chain.
    monkeypatch.setattr(sinks, "_READ_BYTES", 1)
    x, y = _toy()
    kw = _kwargs(chains=3, store_logits=True)
    memory = bayesflat.sample(_model(), (x, y), **kw)
    folder = bayesflat.sample(_model(), (x, y), output=tmp_path, **kw)
    assert_same_draws(memory, folder)
    loaded = bayesflat.load(tmp_path)
    returned, stored = groups(folder), groups(loaded)
    assert list(returned) == list(stored)
    for name, data in returned.items():
        xr.testing.assert_identical(data, stored[name])
        for key, value in data.attrs.items():
            assert type(value) is type(stored[name].attrs[key]), (name, key)
    assert root_attrs(folder).keys() == root_attrs(loaded).keys()
    for key, value in root_attrs(folder).items():
        assert type(value) is type(root_attrs(loaded)[key]), key
        np.testing.assert_array_equal(value, root_attrs(loaded)[key])
    assert btrace.trace_attrs(folder) == btrace.trace_attrs(loaded)


def test_interrupted_run_leaves_readable_draw_files_and_a_partial_trace(tmp_path):
    from test_run import _InterruptAt

    x, y = _toy()
    with pytest.raises(KeyboardInterrupt):
        bayesflat.sample(
            _model(), (x, y), stats_fns={"probe": _InterruptAt(5)}, output=tmp_path,
            checkpoint_every=2, **_kwargs(),
        )  # fmt: skip
    path = RunFolder(tmp_path).draws_path(0)
    assert DrawFile(path).count() >= 4
    partial = bayesflat.load(tmp_path)
    assert btrace.trace_attrs(partial)["draws_kept"] == [4, 0]
    lp = groups(partial)["sample_stats"]["lp"].values
    assert np.isfinite(lp[0, :4]).all() and np.isnan(lp[0, 4:]).all() and np.isnan(lp[1]).all()


def _structure(path) -> dict:
    """Every HDF5 object of a netCDF file: shape, dtype, fill value, layout and attributes,
    references and dimension ids given as the names they point to."""
    out = {}
    with h5py.File(path, "r") as handle:
        scales = {}

        def ids(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.attrs.get("CLASS") == b"DIMENSION_SCALE":
                scales[int(obj.attrs["_Netcdf4Dimid"])] = name

        handle.visititems(ids)

        def visit(name, obj):
            plist = obj.id.get_create_plist()
            entry: dict = {"kind": type(obj).__name__}
            if isinstance(obj, h5py.Dataset):
                entry.update(
                    shape=obj.shape, dtype=str(obj.dtype), fill=repr(obj.fillvalue),
                    chunks=obj.chunks, maxshape=obj.maxshape,
                    string=repr(h5py.check_string_dtype(obj.dtype)),
                    order=plist.get_attr_creation_order(),
                )  # fmt: skip
            else:
                entry["order"] = plist.get_link_creation_order()
            for key, value in obj.attrs.items():
                if key == "DIMENSION_LIST":
                    value = [handle[ref[0]].name for ref in value]
                elif key == "REFERENCE_LIST":
                    value = sorted((handle[ref[0]].name, int(ref[1])) for ref in value)
                elif key == "_Netcdf4Dimid":
                    value = (scales[int(value)], np.asarray(value).dtype.str, np.shape(value))
                elif key == "_Netcdf4Coordinates":
                    value = ([scales[int(i)] for i in value], value.dtype.str)
                elif key in ("created_at", "_NCProperties"):
                    value = type(value).__name__
                elif isinstance(value, np.ndarray):
                    value = (value.dtype.str, value.shape, repr(value.tolist()))
                else:
                    value = (type(value).__name__, repr(value))
                entry[f"attr {key}"] = value
            out[name] = entry

        visit("/", handle)
        handle.visititems(visit)
    return out


def test_trace_nc_is_laid_out_object_for_object_as_xarray_writes_it(tmp_path):
    """The assembler writes with h5py what xarray's h5netcdf writer writes for the same trace."""
    x, y = _toy()
    kw = _kwargs(store_logits=True, loo_points=30, stats_fns={"probe": _zero})
    bayesflat.sample(_model(), (x, y), output=tmp_path / "run", **kw)
    trace = bayesflat.load(tmp_path / "run")
    assert "constant_data" in groups(trace)
    reference = bayesflat.save(trace, tmp_path / "reference.nc")
    ours, theirs = _structure(tmp_path / "run" / "trace.nc"), _structure(reference)
    assert ours.keys() == theirs.keys()
    for name, entry in ours.items():
        assert entry == theirs[name], name


def test_the_returned_trace_reads_subsets_and_survives_pickling(tmp_path):
    import pickle

    x, y = _toy()
    kw = _kwargs(chains=3)
    trace = bayesflat.sample(_model(), (x, y), output=tmp_path, **kw)
    weights = groups(trace)["weights"]
    name = next(iter(weights.data_vars))
    whole = weights[name].values
    picked = weights[name].isel(chain=[0, 2], draw=slice(3, 9, 2)).values
    np.testing.assert_array_equal(picked, whole[[0, 2], 3:9:2])
    copy = pickle.loads(pickle.dumps(trace))
    assert_same_draws(trace, copy)


def test_draw_files_of_chains_past_nine_keep_their_records_aligned(tmp_path):
    folder = RunFolder(tmp_path)
    sink = FolderSink(folder, 12, 3, {})
    for chain in (0, 11):
        sink.begin(chain, 0)
        for i in range(3):
            sink.write(chain, i, _record(10 * chain + i))
        sink.flush(chain)
        draws = DrawFile(folder.draws_path(chain))
        assert draws.count() == 3
        [(_, _, arrays)] = draws.blocks(3)
        assert list(arrays["sample_stats"]["lp"]) == [-10.0 * chain - i for i in range(3)]
