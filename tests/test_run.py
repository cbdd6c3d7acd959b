"""The run engine: pure chains, streaming to disk, bit-exact resume, executors."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import bayesflat
from bayesflat import trace as btrace
from bayesflat.run.checkpoint import load_checkpoint
from bayesflat.run.progress import Progress
from bayesflat.run.sinks import DrawFile
from bayesflat.run.spec import chain_seeds
from bayesflat.run.stream import MinibatchStream, TrainData

REPO = Path(__file__).resolve().parents[1]


def _toy(n: int = 96, d: int = 5, k: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, k, generator=g)
    y = (x @ w + 0.3 * torch.randn(n, k, generator=g)).argmax(dim=1)
    return x, y


def _model(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(5, 8), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(8, 3))


EVAL = {"test": _toy(40, seed=1), "ood": 3.0 * _toy(10, seed=2)[0]}


def _kwargs(**kw):
    args = dict(
        sampler="fsgld", chains=2, burn_in=10, draws=12, thin=2, batch_size=16, seed=3,
        eval_sets=EVAL, progress=False, lr=0.05,
    )  # fmt: skip
    args.update(kw)
    return args


def assert_same_draws(a, b, skip: tuple[str, ...] = ()) -> None:
    """Every draw variable of every group equal, array for array (NaN equal to NaN)."""
    ga, gb = btrace.groups(a), btrace.groups(b)
    assert set(ga) == set(gb)
    for group, data in ga.items():
        assert set(data.data_vars) == set(gb[group].data_vars), group
        for name in data.data_vars:
            if name in skip:
                continue
            x, y = data[name].values, gb[group][name].values
            assert x.dtype == y.dtype and x.shape == y.shape, (group, name)
            assert np.array_equal(x, y, equal_nan=True), (group, name)


class _InterruptAt:
    """A per-draw statistic that raises KeyboardInterrupt (a Ctrl-C) at its ``at``-th call."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, model: nn.Module, sampler: object) -> float:
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return 0.0


def _zero(model: nn.Module, sampler: object) -> float:
    return 0.0


_READERS = ("xarray", "pandas", "scipy", "arviz", "matplotlib", "sklearn", "h5netcdf")
"""What reading, summarising and plotting a trace need, and a chain process does not."""


def _readers_loaded(model: nn.Module, sampler: object) -> float:
    return float(sum(name in sys.modules for name in _READERS))


def _parent_pid(model: nn.Module, sampler: object) -> float:
    return float(os.getppid())


@pytest.mark.parametrize("sampler", ["sgld", "fsgld", "sghmc", "csgld", "swag"])
def test_n_draws_resume_n_draws_equals_2n_straight(sampler, tmp_path):
    x, y = _toy()
    kw = _kwargs(sampler=sampler)
    straight = bayesflat.sample(_model(), (x, y), stats_fns={"probe": _zero}, **kw)
    # Interrupted at the 7th recorded draw: chain 0 half done (swag: inside its draw phase).
    with pytest.raises(KeyboardInterrupt):
        bayesflat.sample(
            _model(), (x, y), stats_fns={"probe": _InterruptAt(7)}, output=tmp_path,
            checkpoint_every=2, **kw,
        )  # fmt: skip
    state = load_checkpoint(tmp_path / "chains" / "chain_0000" / "checkpoint.pt")
    assert not state.done
    assert not (tmp_path / "trace.nc").exists()
    resumed = bayesflat.resume(
        tmp_path, _model(), (x, y), eval_sets=EVAL, stats_fns={"probe": _zero}, progress=False
    )
    assert_same_draws(straight, resumed)
    attrs = btrace.trace_attrs(resumed)
    assert attrs["complete"] is True and attrs["draws_kept"] == [12, 12]


def test_run_chain_stops_cleanly_and_continues(tmp_path, device):
    from bayesflat.run.chain import ChainStopped, run_chain
    from bayesflat.run.sinks import FolderSink, MemorySink, RunFolder

    x, y = _toy()
    spec = bayesflat.run.make_spec(
        _model(), (x, y), sampler="sghmc", chains=1, burn_in=10, draws=12, thin=2, batch_size=16,
        eval_sets=EVAL, seed=3, lr=0.05, device=str(device),
    )  # fmt: skip
    whole = MemorySink(1, 12)
    run_chain(spec, 0, whole)
    folder = RunFolder(tmp_path)
    sink = FolderSink(folder, 1, 12, {})
    saved = []
    steps = iter(range(10**6))
    with pytest.raises(ChainStopped):
        run_chain(spec, 0, sink, checkpoint=saved.append, should_stop=lambda: next(steps) == 17)
    assert saved and saved[-1].kept == 4  # step 18 stopped after draws at steps 12..18
    rest = MemorySink(1, 12)
    run_chain(spec, 0, rest, saved[-1])
    for group, variables in whole._arrays.items():
        for name, array in variables.items():
            np.testing.assert_array_equal(rest._arrays[group][name][0, 4:], array[0, 4:])


def test_memory_folder_and_process_runs_are_identical(tmp_path):
    x, y = _toy()
    kw = _kwargs(chains=3, sampler="fsgld", store_logits=True)
    kw["stats_fns"] = {"readers": _readers_loaded, "parent": _parent_pid}
    probes = ("readers", "parent")
    memory = bayesflat.sample(_model(), (x, y), **kw)
    folder = bayesflat.sample(_model(), (x, y), output=tmp_path / "run", **kw)
    processes = bayesflat.sample(_model(), (x, y), workers=2, **kw)
    again = bayesflat.sample(_model(), (x, y), workers=2, **kw)
    assert_same_draws(memory, folder, skip=probes)
    assert_same_draws(memory, processes, skip=probes)
    assert_same_draws(memory, again, skip=probes)
    # A worker process starts without the trace readers' imports (seconds of start-up), while
    # this process holds them once it has built a trace (the memory run's).
    assert (processes.sample_stats["readers"].values == 0).all()
    assert (folder.sample_stats["readers"].values > 0).all()
    if sys.platform.startswith("linux"):
        # Workers fork from one server, which the second run reuses: no import of torch again.
        parents = {*processes.sample_stats["parent"].values.ravel()}
        assert parents == {*again.sample_stats["parent"].values.ravel()}
        assert len(parents) == 1 and os.getpid() not in parents
    assert btrace.trace_attrs(processes)["chains"] == 3
    # The folder holds the assembled trace, the chains' checkpoints and no draw files.
    run = tmp_path / "run"
    assert (run / "trace.nc").is_file() and (run / "run.json").is_file()
    assert sorted(p.name for p in (run / "chains").iterdir()) == [
        "chain_0000", "chain_0001", "chain_0002"
    ]  # fmt: skip
    assert [p.name for p in (run / "chains" / "chain_0001").iterdir()] == ["checkpoint.pt"]
    assert_same_draws(memory, bayesflat.load(run), skip=probes)


def test_processes_refuse_unpicklable_statistics():
    x, y = _toy()
    with pytest.raises(ValueError, match=r"stats_fns\['f'\] cannot be sent.*workers > 1"):
        bayesflat.sample(_model(), (x, y), workers=2, stats_fns={"f": lambda m, s: 0.0},
                         **_kwargs())  # fmt: skip


def test_dropout_masks_come_from_the_chain_seed_and_leave_the_global_rng_alone():
    x, y = _toy()
    model = _model(dropout=0.5)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = bayesflat.sample(model, (x, y), **_kwargs(sampler="sgld"))
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # a different global state must not change the draws
    b = bayesflat.sample(_model(dropout=0.5), (x, y), **_kwargs(sampler="sgld"))
    assert_same_draws(a, b)
    c = bayesflat.sample(_model(dropout=0.5), (x, y), **_kwargs(sampler="sgld", seed=4))
    assert not np.array_equal(
        btrace.groups(a)["weights"]["0.weight"].values,
        btrace.groups(c)["weights"]["0.weight"].values,
    )


def test_chain_seeds_are_global_and_distinct():
    seeds = [chain_seeds(0, c) for c in range(4)]
    assert len({s for chain in seeds for s in chain}) == 16
    assert chain_seeds(0, 3) == seeds[3]
    assert chain_seeds(1, 3) != seeds[3]


class _Augmented(Dataset):
    """Items drawn with torch's global generator, as random crops and flips are."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.1 * torch.randn(self.x.shape[1]), self.y[i]


@pytest.mark.parametrize("kind", ["tensors", "dataset"])
def test_stream_resumes_after_any_batch(kind):
    x, y = _toy()
    data = TrainData((x, y) if kind == "tensors" else _Augmented(x, y))
    ref = MinibatchStream(data, 16, 7, torch.device("cpu"))
    batches = [next(ref) for _ in range(20)]  # three epochs and a bit
    for cut in (0, 5, 6, 13):
        stream = MinibatchStream(data, 16, 7, torch.device("cpu"))
        for _ in range(cut):
            next(stream)
        state = stream.state_dict()
        again = MinibatchStream(data, 16, 7, torch.device("cpu"))
        again.load_state_dict(state)
        for i in range(cut, 20):
            xb, yb = next(again)
            assert torch.equal(xb, batches[i][0]) and torch.equal(yb, batches[i][1]), (cut, i)


def test_resume_refuses_different_settings(tmp_path):
    x, y = _toy()
    with pytest.raises(KeyboardInterrupt):
        bayesflat.sample(_model(), (x, y), output=tmp_path, checkpoint_every=1,
                         stats_fns={"probe": _InterruptAt(3)}, **_kwargs())  # fmt: skip
    with pytest.raises(
        ValueError, match=r"differ from the stored run: lr \(run folder: 0.05, now: 0.1\)"
    ):
        bayesflat.resume(tmp_path, _model(), (x, y), eval_sets=EVAL, stats_fns={"probe": _zero},
                         lr=0.1, progress=False)  # fmt: skip
    x2 = x.clone()
    x2[0, 0] += 1.0
    with pytest.raises(ValueError, match="train_fingerprint"):
        bayesflat.resume(tmp_path, _model(), (x2, y), eval_sets=EVAL, stats_fns={"probe": _zero},
                         progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="eval_sets"):
        bayesflat.resume(tmp_path, _model(), (x, y), eval_sets={"test": EVAL["test"]},
                         stats_fns={"probe": _zero}, progress=False)  # fmt: skip
    with pytest.raises(ValueError, match="started from Python"):
        bayesflat.resume(tmp_path)
    # The partial run reads as a partial trace.
    partial = bayesflat.load(tmp_path)
    attrs = btrace.trace_attrs(partial)
    assert attrs["complete"] is False and attrs["draws_kept"] == [2, 0]


def test_an_existing_run_is_not_overwritten(tmp_path):
    x, y = _toy()
    bayesflat.sample(_model(), (x, y), output=tmp_path, **_kwargs(draws=2))
    with pytest.raises(ValueError, match="already holds a finished run.*resume.*overwrite=True"):
        bayesflat.sample(_model(), (x, y), output=tmp_path, **_kwargs(draws=2))
    tr = bayesflat.sample(_model(), (x, y), output=tmp_path, overwrite=True, **_kwargs(draws=3))
    assert btrace.trace_attrs(tr)["draws_kept"] == [3, 3]
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        bayesflat.sample(_model(), (x, y), output=tmp_path / "file", **_kwargs())


def test_runs_too_large_for_memory_are_refused_with_the_figure():
    x, y = _toy()
    with pytest.raises(ValueError, match=r"need about .* GiB .* draws x .* only .* free in memory"):
        bayesflat.sample(_model(), (x, y), **_kwargs(draws=10**8))


def test_progress_on_a_log_is_a_line_every_ten_percent():
    out = io.StringIO()
    bar = Progress([0, 1], planned=500, draws=10, stream=out)
    for step in range(0, 501, 5):
        for chain in (0, 1):
            bar.update(chain, step, 500, step // 50, 1.5)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[-1].startswith("bayesflat: 100% (1000/1000 steps), draws 10/10, potential 1.5")


# -- a real kill -9 --------------------------------------------------------------------------------

RUN = [
    sys.executable, "-m", "bayesflat.cli", "run", "--chains", "2", "--burn-in", "40", "--draws",
    "16", "--thin", "4", "--no-report", "--no-progress", "--checkpoint-every", "1",
    "--replicates", "20",
]  # fmt: skip


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(RUN + args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)  # fmt: skip


def _every_file_readable(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_dir() or path.name.startswith("."):
            continue  # .tmp files are a killed writer's; resume removes them
        if path.suffix in (".nc", ".h5"):
            with h5py.File(path, "r") as handle:
                assert handle.attrs["created_by"] == "bayesflat", path
        elif path.suffix == ".pt":
            load_checkpoint(path)
        elif path.suffix == ".bin":
            DrawFile(path).count()
        elif path.suffix == ".json":
            json.loads(path.read_text())


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_equals_the_uninterrupted_run(tmp_path, capsys):
    from bayesflat import cli

    # The uninterrupted run, the refused resume and the last resume need no process of their
    # own; the killed ones do.
    assert cli.main([*RUN[3:], "--output", str(tmp_path / "straight")]) == 0
    folder = tmp_path / "killed"
    rng = np.random.default_rng(2024)
    kills = 0
    proc = _cli(["--output", str(folder)])
    while proc is not None:
        # Wait for the run to get going (a checkpoint), then kill it a random moment later.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any(folder.glob("chains/*/checkpoint.pt")):
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.6))
        if proc.poll() is not None:
            break  # finished before the kill
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1
        _every_file_readable(folder)
        if kills == 1 and (folder / ".lock").exists():  # reported, with how to clear it
            capsys.readouterr()
            assert cli.main([*RUN[3:], "--resume", str(folder)]) == 1
            message = capsys.readouterr().err
            assert f"{folder} has a stale lock: process {proc.pid}" in message
            assert f"remove {folder / '.lock'}" in message
        (folder / ".lock").unlink(missing_ok=True)
        proc = _cli(["--resume", str(folder)]) if kills < 5 else None
    assert proc is None, f"the run ended before kill {kills + 1}: {proc.stderr.read().decode()}"
    assert kills >= 5
    assert cli.main([*RUN[3:], "--resume", str(folder)]) == 0
    _every_file_readable(folder)
    assert not list(folder.rglob(".*.tmp"))
    assert_same_draws(bayesflat.load(tmp_path / "straight"), bayesflat.load(folder))


def test_cli_resume_refuses_a_different_option(tmp_path):
    from bayesflat import cli

    assert cli.main([*RUN[3:], "--output", str(tmp_path), "--draws", "2"]) == 0
    # any step size but the run's (the default) is a different option
    assert cli.main(["run", "--resume", str(tmp_path), "--lr", "0.123", "--no-progress"]) == 1


# -- torch.distributed -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_chain_parallel_equals_the_sequential_run(tmp_path):
    args = ["--chains", "3", "--draws", "6", "--no-report", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "BAYESFLAT_DIST_TIMEOUT_MIN": "2"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
        "--master-addr=127.0.0.1", f"--master-port={_free_port()}", "-m", "bayesflat.cli", "run",
        "--output", str(tmp_path / "ranks"), "--burn-in", "20", "--thin", "3", *args,
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().count("wrote ") == 1  # rank 0 reports
    from bayesflat import cli

    assert cli.main(["run", "--output", str(tmp_path / "one"), "--burn-in", "20", "--thin", "3",
                     *args]) == 0  # fmt: skip
    ranks = bayesflat.load(tmp_path / "ranks")
    assert btrace.trace_attrs(ranks)["chains"] == 3
    assert btrace.trace_attrs(ranks)["draws_kept"] == [6, 6, 6]
    assert_same_draws(bayesflat.load(tmp_path / "one"), ranks)


_DATA_PARALLEL_SCRIPT = """
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, sys.argv[2])
import bayesflat
import bayesflat.trace as btrace
from bayesflat.run.chain import ChainFailure
from bayesflat.run.distributed import _check_replicas
from test_run import _kwargs, _model, _toy

out = Path(sys.argv[1])
torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
x, y = _toy()
trace = bayesflat.sample(_model(), (x, y), parallel="data", **_kwargs(batch_size=32))
if rank == 0:
    btrace.save(trace, out / "data.nc")
# Replicas that differ are caught: perturb rank 1 and check.
params = [torch.ones(3)]
if rank == 1:
    params[0][0] += 1e-6
try:
    _check_replicas(params)
except ChainFailure as err:
    (out / f"caught{rank}").write_text(str(err))
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_data_parallel_equals_the_single_process_run_and_replicas_are_checked(tmp_path):
    script = tmp_path / "data_parallel.py"
    script.write_text(_DATA_PARALLEL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
        "--master-addr=127.0.0.1", f"--master-port={_free_port()}", str(script), str(tmp_path),
        str(Path(__file__).parent),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    x, y = _toy()
    single = bayesflat.sample(_model(), (x, y), **_kwargs(batch_size=32))
    data = btrace.load(tmp_path / "data.nc")
    for group in ("weights", "predictions", "sample_stats"):
        a, b = btrace.groups(single)[group], btrace.groups(data)[group]
        for name in a.data_vars:
            np.testing.assert_allclose(b[name].values, a[name].values, rtol=1e-4, atol=1e-5)
    for rank in (0, 1):
        assert "replicas diverged" in (tmp_path / f"caught{rank}").read_text()


# -- vectorised ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampler, options",
    [("sgld", {}), ("fsgld", {"num_perturbations": 2, "antithetic": True,
                              "perturbation": "rademacher"})],
)  # fmt: skip
def test_vectorised_chains_equal_the_sequential_chains(sampler, options):
    x, y = _toy()
    kw = _kwargs(sampler=sampler, chains=3, **options)
    one_by_one = bayesflat.sample(_model(), (x, y), **kw)
    batched = bayesflat.sample(_model(), (x, y), executor="vectorised", **kw)
    ga, gb = btrace.groups(one_by_one), btrace.groups(batched)
    for group in ("weights", "posterior", "predictions", "heldout_log_likelihood"):
        for name in ga[group].data_vars:
            np.testing.assert_allclose(gb[group][name].values, ga[group][name].values,
                                       rtol=1e-4, atol=1e-5)  # fmt: skip
    stats_a, stats_b = ga["sample_stats"], gb["sample_stats"]
    for name in ("potential", "grad_norm", "sigma", "step"):
        np.testing.assert_allclose(stats_b[name].values, stats_a[name].values, rtol=1e-4)


def _relu_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def _frozen_bias_net() -> nn.Module:
    net = _relu_net()
    net[1].bias.requires_grad_(False)
    return net


@pytest.mark.parametrize(
    "net, kw",
    [(_relu_net, {}), (_relu_net, {"likelihood": "gaussian"}),
     (_model, {"prior": None, "init": "reset"})],
)  # fmt: skip
def test_vectorised_chains_equal_the_sequential_chains_per_network_and_likelihood(net, kw):
    x, y = _toy()
    if kw.get("likelihood") == "gaussian":
        y = torch.nn.functional.one_hot(y, 3).float()
        kw = {**kw, "eval_sets": {"test": x[:20]}}
    kw = _kwargs(sampler="fsgld", chains=3, **kw)
    one_by_one = bayesflat.sample(net(), (x, y), **kw)
    batched = bayesflat.sample(net(), (x, y), executor="vectorised", **kw)
    ga, gb = btrace.groups(one_by_one), btrace.groups(batched)
    for group in ("weights", "posterior", "predictions", "heldout_log_likelihood",
                  "log_likelihood"):  # fmt: skip
        if group not in ga:
            continue
        for name in ga[group].data_vars:
            np.testing.assert_allclose(gb[group][name].values, ga[group][name].values,
                                       rtol=1e-4, atol=1e-5)  # fmt: skip
    for name in ("potential", "grad_norm"):
        np.testing.assert_allclose(
            gb["sample_stats"][name].values, ga["sample_stats"][name].values, rtol=1e-4
        )


@pytest.mark.parametrize(
    "layers",
    [
        [nn.Flatten(), nn.Linear(6, 7), nn.ReLU(inplace=True), nn.Linear(7, 4)],
        [nn.Linear(6, 7, bias=False), nn.ELU(inplace=True), nn.Tanh(), nn.Linear(7, 4)],
        [nn.Flatten(), nn.Tanh(), nn.Linear(6, 7), nn.GELU(), nn.Flatten(), nn.Linear(7, 4)],
    ],
)
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
def test_batched_forward_and_gradients_equal_each_chains_module(layers, likelihood):
    """The vectorised executor's batched pass gives, row by row, what each chain's own module
    and autograd give: outputs on shared and on per-chain inputs, mean NLL, gradients (also
    added onto existing ones)."""
    from bayesflat.run.vectorised import _BatchedForward
    from bayesflat.target.torch import CategoricalLikelihood, GaussianLikelihood

    lik = CategoricalLikelihood() if likelihood == "categorical" else GaussianLikelihood()
    chains, batch = 3, 5
    nets = []
    for k in range(chains):
        torch.manual_seed(k)
        nets.append(nn.Sequential(*[_copy_layer(layer) for layer in layers]))
    names = [n for n, _ in nets[0].named_parameters()]
    stacked = {n: torch.stack([dict(m.named_parameters())[n].detach() for m in nets])
               for n in names}  # fmt: skip
    forward = _BatchedForward(nets[0], names)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(chains, batch, 6, generator=g)
    shared = torch.randn(9, 6, generator=g)
    if likelihood == "categorical":
        y = torch.randint(0, 4, (chains, batch), generator=g)
    else:
        y = torch.randn(chains, batch, 4, generator=g)
    grads = {n: torch.full_like(p, 0.5) for n, p in stacked.items()}
    nll = forward.value_and_grad_(stacked, grads, x, y, lik, accumulate=True)
    predicted = forward.predict(stacked, shared)
    own_inputs = forward(stacked, x)
    for k, net in enumerate(nets):
        mean_nll = lik.nll(net(x[k]), y[k]).mean()
        mean_nll.backward()
        # float32 sums of at most 7 products: relative rounding a few 1e-7
        torch.testing.assert_close(nll[k], mean_nll.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(predicted[k], net(shared).detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(own_inputs[k], net(x[k]).detach(), rtol=1e-5, atol=1e-6)
        for n, p in net.named_parameters():
            torch.testing.assert_close(grads[n][k], p.grad + 0.5, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
def test_stacked_noise_rows_are_each_chains_own_draws(threads):
    from bayesflat.run.vectorised import ChainGenerators, StackedBuffer

    params = [torch.zeros(3, 4, 5), torch.zeros(3, 7)]
    buf = StackedBuffer(params)
    gens = ChainGenerators(torch.Generator().manual_seed(s) for s in (5, 6, 7))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buf.normal_(gens)
        buf.normal_(gens)
    finally:
        torch.set_num_threads(before)
    for k, seed in enumerate((5, 6, 7)):
        g = torch.Generator().manual_seed(seed)
        torch.empty(27).normal_(generator=g)
        assert torch.equal(buf.chunks[0][k], torch.empty(27).normal_(generator=g))


def _copy_layer(layer: nn.Module) -> nn.Module:
    import copy

    out = copy.deepcopy(layer)
    if isinstance(out, nn.Linear):
        out.reset_parameters()
    return out


@pytest.mark.parametrize("sampler", ["sam", "sghmc", "swag"])
def test_vectorised_refuses_samplers_whose_update_couples_a_chain(sampler):
    x, y = _toy()
    with pytest.raises(ValueError, match="executor='vectorised'.*processes"):
        bayesflat.sample(_model(), (x, y), executor="vectorised", **_kwargs(sampler=sampler))


def test_vectorised_refuses_frozen_parameters():
    x, y = _toy()
    with pytest.raises(ValueError, match="'1.bias' has requires_grad=False.*processes"):
        bayesflat.sample(_frozen_bias_net(), (x, y), executor="vectorised", **_kwargs())


def test_vectorised_refuses_dropout():
    x, y = _toy()
    with pytest.raises(ValueError, match="dropout"):
        bayesflat.sample(_model(dropout=0.2), (x, y), executor="vectorised", **_kwargs())


def test_vectorised_run_interrupted_and_resumed_equals_the_straight_run(tmp_path):
    x, y = _toy()
    kw = _kwargs(sampler="fsgld", executor="vectorised")
    straight = bayesflat.sample(_model(), (x, y), stats_fns={"probe": _zero}, **kw)
    with pytest.raises(KeyboardInterrupt):
        bayesflat.sample(
            _model(), (x, y), stats_fns={"probe": _InterruptAt(9)}, output=tmp_path,
            checkpoint_every=2, **kw,
        )  # fmt: skip
    assert not (tmp_path / "trace.nc").exists()
    resumed = bayesflat.resume(
        tmp_path, _model(), (x, y), eval_sets=EVAL, stats_fns={"probe": _zero}, progress=False,
        executor="vectorised",
    )  # fmt: skip
    assert btrace.trace_attrs(resumed)["draws_kept"] == [12, 12]
    ga, gb = btrace.groups(straight), btrace.groups(resumed)
    for group in ("weights", "posterior", "predictions"):
        for name in ga[group].data_vars:
            np.testing.assert_allclose(gb[group][name].values, ga[group][name].values,
                                       rtol=1e-4, atol=1e-5)  # fmt: skip


def test_cli_runs_the_chains_vectorised(tmp_path):
    from bayesflat import cli

    args = ["--burn-in", "10", "--thin", "2", "--draws", "3", "--chains", "2", "--no-report",
            "--no-progress"]  # fmt: skip
    assert (
        cli.main(["run", "--output", str(tmp_path / "v"), "--executor", "vectorised", *args]) == 0
    )
    assert cli.main(["run", "--output", str(tmp_path / "s"), *args]) == 0
    ga, gb = (
        btrace.groups(bayesflat.load(tmp_path / "s")),
        btrace.groups(bayesflat.load(tmp_path / "v")),
    )
    for name in ga["posterior"].data_vars:
        np.testing.assert_allclose(gb["posterior"][name].values, ga["posterior"][name].values,
                                   rtol=1e-4, atol=1e-5)  # fmt: skip


# -- what the predictions group stores -------------------------------------------------------------


def test_logits_only_traces_give_the_probabilities_of_full_traces():
    """``store_probabilities=False`` stores ``<set>_logits`` alone; readers take their
    softmax with the engine's own operation, so ensembles, set lists and convergence
    functionals equal those of a trace that stored probabilities, bit for bit."""
    from bayesflat import predictive
    from bayesflat.diagnostics import functionals

    full = bayesflat.sample(_model(), _toy(), **_kwargs(draws=3, store_logits=True))
    lean = bayesflat.sample(
        _model(), _toy(), **_kwargs(draws=3, store_logits=True, store_probabilities=False)
    )
    assert set(btrace.get_group(lean, "predictions").data_vars) == {"test_logits", "ood_logits"}
    assert btrace.trace_attrs(lean)["store_probabilities"] is False
    assert predictive.eval_sets(lean) == predictive.eval_sets(full) == {"test": True, "ood": False}
    for name in ("test", "ood"):
        a, b = predictive.from_trace(full, name), predictive.from_trace(lean, name)
        assert np.array_equal(a.probs, b.probs) and np.array_equal(a.logits, b.logits)
    fa, fb = functionals(full), functionals(lean)
    assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)


def test_float16_predictions_round_to_half_precision():
    """float16 keeps 11 significant bits: a probability in [0, 1] moves by at most half a
    unit in the last place at 1, 2^-12; a logit z by at most |z| 2^-11, or half the
    subnormal spacing, 2^-25, near 0."""
    from bayesflat import predictive

    runs = {
        dtype: bayesflat.sample(
            _model(), _toy(), **_kwargs(draws=3, store_logits=True, prediction_dtype=dtype)
        )
        for dtype in ("float32", "float16")
    }
    group = btrace.get_group(runs["float16"], "predictions")
    assert {str(group[v].dtype) for v in group.data_vars} == {"float16"}
    p32, p16 = (predictive.from_trace(runs[d]) for d in ("float32", "float16"))
    assert np.abs(p16.probs.astype(np.float64) - p32.probs).max() <= 2.0**-12
    z32 = p32.logits.astype(np.float64)
    assert np.all(np.abs(p16.logits - z32) <= np.abs(z32) * 2.0**-11 + 2.0**-25)


def test_prediction_storage_options_are_checked():
    with pytest.raises(ValueError, match="store_logits and store_probabilities"):
        bayesflat.sample(_model(), _toy(), **_kwargs(store_probabilities=False))
    with pytest.raises(ValueError, match="prediction_dtype"):
        bayesflat.sample(_model(), _toy(), **_kwargs(prediction_dtype="bfloat16"))
