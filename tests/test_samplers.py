"""SGD, SGLD and fSGLD: exact limits, perturbation groups, memory, determinism, validation.

Exactness is bit-for-bit (``torch.equal``): at ``T = 0`` every sampler is ``torch.optim.SGD``,
and an fSGLD step is reproduced from a replayed generator. Where a reproduction multiplies by
``lr`` or ``sigma`` these are powers of two, so the product is exact and the one rounding of
the sum is the same whichever kernel computes it.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import python_output
from torch import Tensor, nn

from bayesflat import samplers
from bayesflat.samplers import (
    FSGLD,
    SGD,
    SGLD,
    Sampler,
    coupled_sigma,
    exclude_from_perturbation,
    registry,
)
from bayesflat.target.torch import Posterior

NUM_DATA = 64
BATCH = 16


def mlp(seed: int = 0, *, batch_norm: bool = False) -> nn.Sequential:
    """A small classifier whose weights come from a fixed generator."""
    layers: list[nn.Module] = [nn.Linear(5, 8)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 3)]
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g) + (1.0 if p.dim() == 1 else 0.0))
    return model


def dataset(seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(NUM_DATA, 5, generator=g), torch.randint(0, 3, (NUM_DATA,), generator=g)


def batches(step: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Minibatch ``step`` of a fixed shuffled epoch cycle."""
    order = torch.randperm(NUM_DATA, generator=torch.Generator().manual_seed(step // 4))
    idx = order[(step % 4) * BATCH : (step % 4 + 1) * BATCH]
    return x[idx], y[idx]


def posterior(model: nn.Module, temperature: float = 1.0) -> Posterior:
    return Posterior(model, num_data=NUM_DATA, temperature=temperature, prior=1.0)


def flat(params: list[Tensor]) -> list[Tensor]:
    return [p.detach().clone() for p in params]


def replay_normal(generator: torch.Generator, params: list[Tensor]) -> list[Tensor]:
    """The draw a sampler's flat buffer makes next: one normal_ over all parameters in order."""
    sizes = [p.numel() for p in params]
    noise = torch.empty(sum(sizes)).normal_(generator=generator)
    return [v.view_as(p) for v, p in zip(noise.split(sizes), params, strict=True)]


def copy_generator(generator: torch.Generator) -> torch.Generator:
    replay = torch.Generator()
    replay.set_state(generator.get_state())
    return replay


def groups_of(model: nn.Sequential, grouped: bool) -> list:
    if not grouped:
        return list(model.parameters())
    return [{"params": model[0].parameters(), "lr": 0.2}, {"params": model[-1].parameters()}]


# -- T = 0 is torch.optim.SGD ---------------------------------------------------------------------

COLD = {
    "sgd": lambda params, g: SGD(params, lr=0.05, num_data=NUM_DATA),
    "sgld-T0": lambda params, g: SGLD(
        params, lr=0.05, num_data=NUM_DATA, temperature=0.0, generator=g
    ),
    "fsgld-T0-sigma0": lambda params, g: FSGLD(
        params, lr=0.05, num_data=NUM_DATA, temperature=0.0, sigma=0.0, generator=g
    ),
    "fsgld-T0-coupled": lambda params, g: FSGLD(
        params, lr=0.05, num_data=NUM_DATA, temperature=0.0, sigma=None, generator=g
    ),
}


@pytest.mark.parametrize("grouped", [False, True], ids=["one-group", "two-lrs"])
@pytest.mark.parametrize("name", list(COLD))
def test_zero_temperature_is_torch_sgd(name, grouped, device):
    x, y = (t.to(device) for t in dataset())
    ours, ref = mlp().to(device), mlp().to(device)
    sampler = COLD[name](groups_of(ours, grouped), torch.Generator(device).manual_seed(3))
    reference = torch.optim.SGD(groups_of(ref, grouped), lr=0.05)
    post, ref_post = posterior(ours, temperature=0.0), posterior(ref, temperature=0.0)

    for step in range(20):
        xb, yb = batches(step, x, y)

        def ref_closure(xb=xb, yb=yb):
            reference.zero_grad()
            loss = ref_post.potential(xb, yb)
            loss.backward()
            return loss

        loss = sampler.step(post.closure(xb, yb))
        ref_loss = reference.step(ref_closure)
        assert torch.equal(loss, ref_loss.detach())
        for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
            assert torch.equal(p, q), f"step {step}"
    assert sampler.stats()["sigma"] == 0.0
    assert sampler._buffers == {}  # nothing drawn, nothing allocated


def test_fsgld_cold_step_moves_by_minus_lr_times_the_perturbed_gradient():
    x, y = dataset()
    model = mlp()
    params = list(model.parameters())
    lr, sigma = 0.125, 0.25
    sampler = FSGLD(
        params,
        lr=lr,
        num_data=NUM_DATA,
        temperature=0.0,
        sigma=sigma,
        generator=torch.Generator().manual_seed(4),
    )
    post = posterior(model, temperature=0.0)
    for step in range(10):
        before = flat(params)
        seen: list[list[Tensor]] = []
        inner = post.closure(*batches(step, x, y))

        def closure(inner=inner, seen=seen):
            seen.append(flat(params))
            return inner()

        eps = replay_normal(copy_generator(sampler.generator), params)
        sampler.step(closure)
        assert len(seen) == 1
        for at, b, e in zip(seen[0], before, eps, strict=True):
            assert torch.equal(at, b + sigma * e)
        # The perturbation is undone exactly: only -lr * g remains, g the estimator's gradient.
        for p, b in zip(params, before, strict=True):
            assert torch.equal(p, b - lr * p.grad)


@pytest.mark.parametrize(("num_perturbations", "antithetic"), [(3, False), (2, True)])
def test_perturbation_draws_are_averaged(num_perturbations, antithetic):
    x, y = dataset()
    model = mlp()
    params = list(model.parameters())
    sigma = 0.25
    sampler = FSGLD(
        params,
        lr=0.125,
        num_data=NUM_DATA,
        temperature=0.0,
        sigma=sigma,
        num_perturbations=num_perturbations,
        antithetic=antithetic,
        generator=torch.Generator().manual_seed(5),
    )
    post = posterior(model, temperature=0.0)
    xb, yb = batches(0, x, y)
    seen: list[list[Tensor]] = []

    def closure():
        seen.append(flat(params))
        return post.closure(xb, yb)()

    replay = copy_generator(sampler.generator)
    before = flat(params)
    loss = sampler.step(closure)
    signs = (1.0, -1.0) if antithetic else (1.0,)
    assert len(seen) == num_perturbations * len(signs)

    # Reference: the gradient at every perturbed point, in the same order, averaged.
    points = []
    for _ in range(num_perturbations):
        eps = replay_normal(replay, params)
        points += [[b + s * sigma * e for b, e in zip(before, eps, strict=True)] for s in signs]
    check = mlp()
    check_post = posterior(check, temperature=0.0)
    grads, losses = [], []
    for point, at in zip(points, seen, strict=True):
        for got, want in zip(at, point, strict=True):
            assert torch.equal(got, want)
        with torch.no_grad():
            for q, v in zip(check.parameters(), point, strict=True):
                q.copy_(v)
        check.zero_grad(set_to_none=True)
        losses.append(check_post.closure(xb, yb)())
        grads.append([q.grad.clone() for q in check.parameters()])
    for i, p in enumerate(params):
        mean = torch.stack([g[i] for g in grads]).mean(dim=0)
        torch.testing.assert_close(p.grad, mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss, torch.stack(losses).mean())


def test_rademacher_perturbation_is_plus_or_minus_sigma():
    weight = nn.Parameter(torch.zeros(4000))
    sigma = 0.5
    sampler = FSGLD(
        [weight],
        lr=0.125,
        num_data=NUM_DATA,
        temperature=0.0,
        sigma=sigma,
        perturbation="rademacher",
        generator=torch.Generator().manual_seed(6),
    )
    seen: list[Tensor] = []

    def closure():
        seen.append(weight.detach().clone())
        loss = 0.0 * weight.sum()
        loss.backward()
        return loss.detach()

    replay = copy_generator(sampler.generator)
    sampler.step(closure)
    # One integer draw: 64 words of 63 random bits (bit i of word j is sign 63 j + i).
    words = torch.empty(64, dtype=torch.int64).random_(generator=replay)
    bits = torch.stack([(words >> i) & 1 for i in range(63)], dim=1).reshape(-1)[:4000]
    signs = bits.float() * 2.0 - 1.0
    assert torch.equal(seen[0], sigma * signs)
    assert set(seen[0].unique().tolist()) == {-sigma, sigma}
    # P(+1) = 1/2: the count of +sigma is within 4 binomial SE of 2000
    assert abs(int((seen[0] > 0).sum()) - 2000) < 4 * math.sqrt(4000 * 0.25)


def test_rademacher_signs_are_fair_in_every_bit_position():
    """Each of the 63 bits a word gives is a fair coin: per position, the count of +1 over
    4000 words is within 4 binomial standard errors of 2000 (63 positions, so the chance that
    any fails by luck is below 63 * 6.3e-5 = 0.4%)."""
    flat = torch.empty(63 * 4000)
    samplers.base.fill_rademacher_(flat, torch.Generator().manual_seed(11))
    assert set(flat.unique().tolist()) == {-1.0, 1.0}
    plus = (flat.view(4000, 63) > 0).sum(dim=0)
    assert int((plus - 2000).abs().max()) < 4 * math.sqrt(4000 * 0.25)
    # neighbouring signs are uncorrelated: the mean product is within 4 SE (1/sqrt(n)) of 0
    products = flat[:-1] * flat[1:]
    assert abs(float(products.mean())) < 4 / math.sqrt(products.numel())


def test_step_calls_the_step_hooks_users_register():
    """Global and per-optimiser pre/post hooks run once per step, in torch's order, with the
    optimiser and the step's arguments, also for a subclass whose step calls super().step."""
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    x, y = dataset()
    calls: list[tuple[str, object, int]] = []

    def hook(tag: str):
        return lambda opt, args, kwargs: calls.append((tag, opt, len(args) + len(kwargs)))

    for name in ("sgld", "fsgld", "swa"):
        model = mlp()
        opt = samplers.get(name)(
            list(model.parameters()), lr=0.01, num_data=NUM_DATA,
            temperature=1.0 if samplers.entry(name).is_sampler else 0.0,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        handles = [
            register_optimizer_step_pre_hook(hook("global pre")),
            opt.register_step_pre_hook(hook("pre")),
            opt.register_step_post_hook(hook("post")),
            register_optimizer_step_post_hook(hook("global post")),
        ]
        calls.clear()
        try:
            for step in range(2):
                opt.step(posterior(model).closure(*batches(step, x, y)))
        finally:
            for handle in handles:
                handle.remove()
        order = ["global pre", "pre", "post", "global post"]
        assert [tag for tag, _, _ in calls] == order * 2, name
        assert all(o is opt and n == 1 for _, o, n in calls), name
        opt.step(posterior(model).closure(*batches(2, x, y)))
        assert len(calls) == 8, f"{name}: a removed hook still ran"


def test_step_pre_hook_may_replace_the_closure():
    """A pre-hook returning ``(args, kwargs)`` changes what step receives, as in torch."""
    x, y = dataset()
    model = mlp()
    opt = SGLD(model.parameters(), lr=0.01, num_data=NUM_DATA, temperature=0.0)
    post = posterior(model)
    evaluated: list[str] = []

    def replacement() -> Tensor:
        evaluated.append("replacement")
        return post.closure(*batches(0, x, y))()

    handle = opt.register_step_pre_hook(lambda o, args, kwargs: ((replacement,), {}))
    try:
        opt.step(post.closure(*batches(1, x, y)))
    finally:
        handle.remove()
    assert evaluated == ["replacement"]


# -- which parameters are perturbed ---------------------------------------------------------------


def perturbation_seen(sampler: Sampler, model: nn.Module, step: int = 0) -> list[Tensor]:
    """Parameter values at the (single) closure call of one step."""
    x, y = dataset()
    inner = posterior(model).closure(*batches(step, x, y))
    seen: list[list[Tensor]] = []

    def closure():
        seen.append(flat(list(model.parameters())))
        return inner()

    sampler.step(closure)
    assert len(seen) == 1
    return seen[0]


def test_group_with_perturb_false_is_never_perturbed():
    model = mlp()
    groups = [
        {"params": model[0].parameters()},
        {"params": model[2].parameters(), "perturb": False},
    ]
    sampler = FSGLD(
        groups,
        lr=0.01,
        num_data=NUM_DATA,
        sigma=0.1,
        generator=torch.Generator().manual_seed(7),
    )
    for step in range(3):
        before = flat(list(model.parameters()))
        seen = perturbation_seen(sampler, model, step)
        w0, b0, w2, b2 = range(4)
        for i in (w0, b0):
            assert not torch.any(seen[i] == before[i])  # every element moved by sigma * eps
        for i in (w2, b2):
            assert torch.equal(seen[i], before[i])
        after = flat(list(model.parameters()))
        for i in (w2, b2):  # still moved by the gradient and the Langevin noise
            assert not torch.any(after[i] == before[i])
    assert sampler.stats()["sigma"] == 0.1


def test_exclude_from_perturbation_keeps_batchnorm_exact():
    model = mlp(batch_norm=True)
    groups = exclude_from_perturbation(model)
    bn = model[1]
    assert [id(p) for p in groups[1]["params"]] == [id(bn.weight), id(bn.bias)]
    assert groups[1]["perturb"] is False
    sampler = FSGLD(groups, lr=0.01, num_data=NUM_DATA, generator=torch.Generator().manual_seed(8))
    names = [n for n, _ in model.named_parameters()]
    before = flat(list(model.parameters()))
    seen = perturbation_seen(sampler, model)
    after = flat(list(model.parameters()))
    for name, b, s, a in zip(names, before, seen, after, strict=True):
        if name.startswith("1."):
            assert torch.equal(s, b), name
        else:
            assert not torch.any(s == b), name
        assert not torch.any(a == b), name  # every parameter takes the Langevin move


# -- memory ---------------------------------------------------------------------------------------


def test_fsgld_adds_only_a_backup_buffer_to_sgld():
    x, y = dataset()
    numel = sum(p.numel() for p in mlp().parameters())

    def buffers_after_steps(make) -> dict[str, tuple[int, int]]:
        model = mlp()
        sampler = make(model.parameters())
        closure = posterior(model).closure(*batches(0, x, y))
        sampler.step(closure)
        first = {k: [c.data_ptr() for c in b.chunks] for k, b in sampler._buffers.items()}
        sampler.step(closure)
        again = {k: [c.data_ptr() for c in b.chunks] for k, b in sampler._buffers.items()}
        assert first == again  # allocated once, reused
        return {k: sum(c.numel() for c in b.chunks) for k, b in sampler._buffers.items()}

    g = torch.Generator().manual_seed(9)
    sgld = buffers_after_steps(lambda p: SGLD(p, lr=0.01, num_data=NUM_DATA, generator=g))
    assert sgld == {"noise": numel}
    for options in ({}, {"num_perturbations": 3, "antithetic": True}):
        fsgld = buffers_after_steps(
            lambda p, o=options: FSGLD(p, lr=0.01, num_data=NUM_DATA, generator=g, **o)
        )
        assert fsgld == {"noise": numel, "backup": numel}
    unperturbed = buffers_after_steps(
        lambda p: FSGLD(p, lr=0.01, num_data=NUM_DATA, sigma=0.0, generator=g)
    )
    assert unperturbed == {"noise": numel}


# -- determinism and checkpoints ------------------------------------------------------------------

CHAINS = {
    "sgld": lambda params, g: SGLD(params, lr=0.01, num_data=NUM_DATA, generator=g),
    "fsgld": lambda params, g: FSGLD(params, lr=0.01, num_data=NUM_DATA, generator=g),
    "fsgld-scheduled": lambda params, g: FSGLD(
        params,
        lr=lambda k: 0.02 / (1.0 + 0.1 * k),
        temperature=lambda k: 1.0 + 0.05 * k,
        num_data=NUM_DATA,
        num_perturbations=2,
        antithetic=True,
        perturbation="rademacher",
        generator=g,
    ),
}


def run(
    name: str,
    seed: int,
    steps: range,
    model: nn.Module | None = None,
    state=None,
    device: torch.device | str = "cpu",
):
    model = model if model is not None else mlp().to(device)
    x, y = (t.to(device) for t in dataset())
    sampler = CHAINS[name](model.parameters(), torch.Generator(device).manual_seed(seed))
    if state is not None:
        sampler.load_state_dict(state)
    post = posterior(model)
    for step in steps:
        sampler.step(post.closure(*batches(step, x, y)))
    return model, sampler


@pytest.mark.parametrize("name", list(CHAINS))
def test_same_seed_same_chain(name, device):
    first, _ = run(name, 10, range(50), device=device)
    second, _ = run(name, 10, range(50), device=device)
    other, _ = run(name, 11, range(50), device=device)
    for p, q, r in zip(first.parameters(), second.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)
        assert not torch.equal(p, r)


@pytest.mark.parametrize("name", list(CHAINS))
def test_state_dict_resumes_bit_for_bit(name, device):
    straight, _ = run(name, 12, range(50), device=device)
    model, sampler = run(name, 12, range(20), device=device)
    state = copy.deepcopy(sampler.state_dict())
    resumed = copy.deepcopy(model)
    # a different seed: the generator state must come from the checkpoint
    resumed, sampler = run(name, 99, range(20, 50), model=resumed, state=state, device=device)
    assert all(g["step"] == 50 for g in sampler.param_groups)
    for p, q in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


# -- the coupling and schedules -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("temperature", "num_data", "eta"),
    [(1.0, 50_000, 0.1), (1.0, 100, 0.5), (0.5, 7, 0.9), (2.0, 1_000, 0.25), (1e-3, 10, 0.05)],
)
def test_coupled_sigma_is_the_papers_formula(temperature, num_data, eta):
    expected = (temperature / num_data) ** ((1 + eta) / 4)
    assert coupled_sigma(temperature, num_data, eta) == expected
    assert coupled_sigma(0.0, num_data, eta) == 0.0

    model = mlp()
    sampler = FSGLD(
        model.parameters(),
        lr=1e-3,
        num_data=num_data,
        temperature=temperature,
        eta=eta,
        generator=torch.Generator().manual_seed(13),
    )
    assert sampler.effective_sigma() == expected
    # the perturbation the closure sees has exactly this scale
    before = flat(list(model.parameters()))
    eps = replay_normal(copy_generator(sampler.generator), list(model.parameters()))
    seen = perturbation_seen(sampler, model)
    for s, b, e in zip(seen, before, eps, strict=True):
        torch.testing.assert_close(s - b, expected * e, rtol=1e-5, atol=1e-6)
    assert sampler.stats()["sigma"] == expected


def test_explicit_sigma_overrides_the_coupling():
    model = mlp()
    sampler = FSGLD(
        model.parameters(),
        lr=1e-3,
        num_data=NUM_DATA,
        sigma=0.3,
        generator=torch.Generator().manual_seed(14),
    )
    assert sampler.effective_sigma() == 0.3
    perturbation_seen(sampler, model)
    assert sampler.stats()["sigma"] == 0.3
    assert coupled_sigma(1.0, NUM_DATA) != 0.3


def test_schedules_are_evaluated_every_step():
    def lr(k: int) -> float:
        return 0.1 / (1.0 + k)

    def temperature(k: int) -> float:
        return 0.5 * (k + 1)

    x, y = dataset()
    model = mlp()
    params = list(model.parameters())
    post = posterior(model)
    sampler = SGLD(
        params,
        lr=lr,
        num_data=NUM_DATA,
        temperature=temperature,
        generator=torch.Generator().manual_seed(15),
    )
    fsgld_model = mlp()
    fsgld = FSGLD(
        fsgld_model.parameters(),
        lr=lr,
        num_data=NUM_DATA,
        temperature=temperature,
        generator=torch.Generator().manual_seed(16),
    )
    fsgld_post = posterior(fsgld_model)
    for k in range(5):
        xb, yb = batches(k, x, y)
        before = flat(params)
        xi = replay_normal(copy_generator(sampler.generator), params)
        sampler.step(post.closure(xb, yb))
        scale = math.sqrt(2.0 * lr(k) * temperature(k) / NUM_DATA)
        # theta <- theta - lr_k g + sqrt(2 lr_k T_k / N) xi, the same two foreach kernels
        for p, b, e in zip(params, before, xi, strict=True):
            expected = b.add(p.grad, alpha=-lr(k)).add(e, alpha=scale)
            assert torch.equal(p, expected)
        stats = sampler.stats()
        assert stats["step_size"] == lr(k)
        assert stats["temperature"] == temperature(k)
        assert sampler.param_groups[0]["step"] == k + 1

        fsgld.step(fsgld_post.closure(xb, yb))
        assert fsgld.stats()["sigma"] == coupled_sigma(temperature(k), NUM_DATA)
        assert fsgld.stats()["step_size"] == lr(k)


# -- validation and the registry ------------------------------------------------------------------


def build(cls, **overrides):
    kwargs = {"lr": 0.01, "num_data": NUM_DATA, **overrides}
    return cls(mlp().parameters(), **kwargs)


BAD = [
    *[
        (cls, {"num_data": bad}, "num_data")
        for cls in (SGD, SGLD, FSGLD)
        for bad in (0, -1, 2.5, True, "10")
    ],
    *[
        (cls, {"temperature": bad}, "temperature")
        for cls in (SGLD, FSGLD)
        for bad in (-1.0, math.nan, math.inf)
    ],
    *[(FSGLD, {"eta": bad}, "eta") for bad in (0, 1, 1.5)],
    (FSGLD, {"sigma": -0.1}, "sigma"),
    (FSGLD, {"num_perturbations": 0}, "num_perturbations"),
    (FSGLD, {"perturbation": "uniform"}, "^perturbation"),
    *[(cls, {"lr": bad}, r"\blr\b") for cls in (SGD, SGLD, FSGLD) for bad in (0, -1)],
    (SGD, {"temperature": 1.0}, "temperature"),
]


@pytest.mark.parametrize(("cls", "overrides", "argument"), BAD)
def test_invalid_arguments_are_refused_by_name(cls, overrides, argument):
    with pytest.raises(ValueError, match=argument):
        build(cls, **overrides)


@pytest.mark.parametrize("cls", [SGD, SGLD, FSGLD])
def test_step_needs_a_closure(cls):
    with pytest.raises(ValueError, match="closure"):
        build(cls).step()


def test_registry():
    names = samplers.available()
    assert {"sgd", "sgld", "fsgld"} <= set(names)
    assert samplers.get("sgd") is SGD
    assert samplers.get("sgld") is SGLD
    assert samplers.get("fsgld") is FSGLD
    with pytest.raises(ValueError, match="nope") as err:
        samplers.get("nope")
    for name in names:
        assert name in str(err.value)
    entries = samplers.describe()
    assert [e.name for e in entries] == names
    for entry in entries:
        assert entry.summary and entry.reference
        assert issubclass(entry.cls, Sampler)
    assert not samplers.entry("sgd").is_sampler
    assert samplers.entry("fsgld").is_sampler


@pytest.mark.parametrize("row", registry.BUILTIN, ids=lambda row: row.name)
def test_registry_table_describes_its_class(row):
    # The table is read without importing torch; this keeps it equal to the classes.
    cls = row.cls
    module, _, name = row.target.partition(":")
    assert (cls.__module__, cls.__name__, cls.name) == (module, name, row.name)
    assert getattr(samplers, name) is cls
    assert list(row.defaults.items()) == list(registry.class_defaults(cls).items())
    assert row.defaults["temperature"] == (1.0 if row.is_sampler else 0.0)
    assert row.options == {k: v for k, v in row.defaults.items() if k not in ("lr", "temperature")}
    assert samplers.entry(row.name) is row


def test_registry_takes_a_class_with_the_defaults_of_its_signature():
    class Quiet(SGLD):
        def __init__(self, params, lr=0.25, *, num_data, temperature=0.5, quiet=True,
                     generator=None):  # fmt: skip
            super().__init__(params, lr, num_data=num_data, temperature=temperature,
                             generator=generator)  # fmt: skip

    entry = samplers.RegistryEntry("quiet", Quiet, "summary", "reference")
    assert entry.cls is Quiet
    assert dict(entry.defaults) == {"lr": 0.25, "temperature": 0.5, "quiet": True}
    assert entry.options == {"quiet": True}


@pytest.mark.slow
def test_samplers_do_not_load_dynamo_until_the_program_does():
    """torch.optim.Optimizer's guarded methods import torch._dynamo at their first call, which
    costs a process more than importing torch. A sampler built, stepped, saved and restored in
    a fresh process leaves it unloaded; in a process that has loaded it, the guarded methods
    are the ones called."""
    code = (
        "import sys, torch\n"
        "from bayesflat.samplers import get\n"
        "def run():\n"
        "    m = torch.nn.Linear(3, 2)\n"
        "    opt = get('fsgld')(m.parameters(), lr=0.01, num_data=10, temperature=1.0)\n"
        "    def closure():\n"
        "        opt.zero_grad()\n"
        "        loss = m(torch.ones(4, 3)).pow(2).mean()\n"
        "        loss.backward()\n"
        "        return loss\n"
        "    opt.step(closure)\n"
        "    opt.load_state_dict(opt.state_dict())\n"
        "    opt.zero_grad(set_to_none=False)\n"
        "run()\n"
        "print('torch._dynamo' in sys.modules)\n"
        "import torch._dynamo\n"
        "calls = []\n"
        "real = torch._dynamo.disable\n"
        "def disable(fn, *a, **k):\n"
        "    calls.append(fn.__name__)\n"
        "    return real(fn, *a, **k)\n"
        "torch._dynamo.disable = disable\n"
        "run()\n"
        "print(sorted(set(calls)))\n"
    )
    loaded, guarded = python_output(code).strip().splitlines()
    assert loaded == "False"
    assert guarded == "['add_param_group', 'load_state_dict', 'state_dict', 'zero_grad']"
