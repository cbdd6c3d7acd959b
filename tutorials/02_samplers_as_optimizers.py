"""Tutorial 2: samplers are torch optimisers: your loop, schedulers, checkpoints, new samplers.

``bayesflat.sample`` runs chains for you; underneath, every sampler is a
``torch.optim.Optimizer`` with a closure-based ``step``, like LBFGS or SAM. This tutorial
drives samplers by hand on digits and shows what that buys:

1. a sampler in a plain training loop, and the Bayesian model average of its draws;
2. ``T = 0`` turns SGLD (and fSGLD) into ``torch.optim.SGD`` and SGHMC into SGD with
   momentum, to the last bit;
3. step sizes from ``torch.optim.lr_scheduler``, or any hyperparameter as a callable of the
   step;
4. ``state_dict`` checkpoints that resume a chain exactly, noise included;
5. param groups that keep BatchNorm out of fSGLD's weight perturbation;
6. a new sampler in one class: a gradient estimator composed with a dynamics.

Units, as everywhere in bayesflat: ``Posterior.closure`` evaluates the minibatch potential
``L_B = mean NLL - log p(theta) / N`` and a Langevin step is
``theta <- theta - lr * grad L_B + sqrt(2 lr T / N) xi``.

Run it with ``python tutorials/02_samplers_as_optimizers.py`` (about half a minute on two
cores); ``BAYESFLAT_TUTORIAL_QUICK=1`` shrinks the budget to a smoke test.
"""

import functools
import os
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

import bayesflat
from bayesflat import Posterior, data, metrics, models, samplers, schedules

QUICK = os.environ.get("BAYESFLAT_TUTORIAL_QUICK") == "1"
BURN_IN, DRAWS, THIN = (100, 10, 10) if QUICK else (1000, 50, 20)
# The digits MLP is too small for a second intra-op thread to pay for its synchronisation.
torch.set_num_threads(1)

digits = data.load_digits_split()
x, y = digits.x_train, digits.y_train
N, BATCH = len(y), 64


@functools.lru_cache(maxsize=2)
def _epoch_order(seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(N, generator=torch.Generator().manual_seed(1000 * seed + epoch))


def batch(step: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Minibatch number ``step``: each epoch a fresh permutation, the last partial batch dropped.

    The minibatch order is a function of the step alone, so a resumed run (section 4) sees the
    same batches as an uninterrupted one.
    """
    epoch, i = divmod(step, N // BATCH)
    idx = _epoch_order(seed, epoch)[i * BATCH : (i + 1) * BATCH]
    return x[idx], y[idx]


def flat(model: nn.Module) -> torch.Tensor:
    """All parameters of ``model`` as one vector, for exact comparisons."""
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# %% 1. A sampler in your own loop ------------------------------------------------------------
# The Posterior is the target (model, likelihood, prior, N, T); the sampler moves the weights.
# Each chain owns a torch.Generator: all its noise comes from there, never from global state.
torch.manual_seed(0)
model = models.MLP()
posterior = Posterior(model, num_data=N, temperature=1.0, prior=1.0)
opt = samplers.FSGLD(
    model.parameters(), lr=0.1, num_data=N, generator=torch.Generator().manual_seed(0)
)
probs = []
for step in range(BURN_IN + DRAWS * THIN):
    opt.step(posterior.closure(*batch(step)))
    if step >= BURN_IN and (step - BURN_IN + 1) % THIN == 0:
        with torch.no_grad():
            probs.append(model(digits.x_test).softmax(dim=-1))
bma = torch.stack(probs).mean(dim=0)  # average probabilities, never logits
print(f"1. fSGLD in a plain loop: {len(probs)} draws")
print(
    f"   BMA test accuracy = {metrics.accuracy(bma, digits.y_test):.4f}, "
    f"NLL = {metrics.nll(bma, digits.y_test):.4f} nats"
)
print("   last step:", {k: round(v, 4) for k, v in opt.stats().items()})


# %% 2. T = 0 is the optimiser, bit for bit ---------------------------------------------------
def final_weights(make_optimizer, steps: int = 50) -> torch.Tensor:
    """Weights after ``steps`` steps from one fixed initialisation and minibatch sequence."""
    torch.manual_seed(0)
    net = models.MLP()
    target = Posterior(net, num_data=N, temperature=0.0, prior=1.0)
    optimizer = make_optimizer(net.parameters())
    for step in range(steps):
        # torch's optimisers leave zeroing to the loop; bayesflat's zero the gradients themselves,
        # so one loop body serves both.
        optimizer.zero_grad()
        optimizer.step(target.closure(*batch(step)))
    return flat(net)


def cold(name: str, **options):
    """A factory of the registered sampler ``name`` at temperature 0."""
    return lambda params: samplers.get(name)(params, lr=0.1, num_data=N, temperature=0.0, **options)


sgd = final_weights(lambda p: torch.optim.SGD(p, lr=0.1))
momentum = final_weights(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
print("\n2. Temperature 0:")
print(f"   SGLD(T=0)  == torch.optim.SGD: {torch.equal(final_weights(cold('sgld')), sgd)}")
# fSGLD's coupled sigma = (T / N)^((1 + eta) / 4) vanishes with T: no perturbation is left.
print(f"   fSGLD(T=0) == torch.optim.SGD: {torch.equal(final_weights(cold('fsgld')), sgd)}")
print(
    "   SGHMC(T=0, alpha=0.1) == torch.optim.SGD(momentum=0.9): "
    f"{torch.equal(final_weights(cold('sghmc', alpha=0.1)), momentum)}"
)

# %% 3. Schedules -----------------------------------------------------------------------------
# Hyperparameters live in the param groups, so torch's schedulers work unchanged...
torch.manual_seed(0)
model = models.MLP()
posterior = Posterior(model, num_data=N, prior=1.0)
opt = samplers.SGLD(
    model.parameters(), lr=0.1, num_data=N, generator=torch.Generator().manual_seed(0)
)
steps = 400
scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=1e-3)
seen = []
for step in range(steps):
    opt.step(posterior.closure(*batch(step)))
    seen.append(opt.stats()["step_size"])
    scheduler.step()
print(
    f"\n3. CosineAnnealingLR: step size {seen[0]:.4f} -> {seen[steps // 2]:.4f} -> {seen[-1]:.4f}"
)

# ...and any hyperparameter may be a callable of the step, evaluated before every step: here
# Welling & Teh's decay lr_t = a (b + t)^(-gamma) and a temperature warmed up from 0 to 1.
opt = samplers.SGLD(
    model.parameters(),
    lr=schedules.polynomial_decay(0.1, b=1.0, gamma=0.55),
    temperature=lambda t: min(1.0, t / 200),
    num_data=N,
    generator=torch.Generator().manual_seed(0),
)
for step in range(steps):
    opt.step(posterior.closure(*batch(step)))
    if step in (0, 100, steps - 1):
        stats = opt.stats()
        print(f"   step {step:3d}: lr = {stats['step_size']:.4f}, T = {stats['temperature']:.2f}")
print(f"   recorded in the trace attributes as lr = {opt.config()['lr']!r}")


# %% 4. Checkpoint and resume -----------------------------------------------------------------
# SGHMC carries state between steps (a momentum per weight) and a noise generator; its
# state_dict holds both, so a chain stopped and resumed is the chain that never stopped.
def sghmc_chain(noise_seed: int):
    torch.manual_seed(0)
    net = models.MLP()
    sampler = samplers.SGHMC(
        net.parameters(),
        lr=0.05,
        num_data=N,
        alpha=0.1,
        generator=torch.Generator().manual_seed(noise_seed),
    )
    return net, Posterior(net, num_data=N, prior=1.0), sampler


total, stop = 2 * BURN_IN, BURN_IN
net, target, sampler = sghmc_chain(noise_seed=7)
for step in range(total):
    sampler.step(target.closure(*batch(step)))
uninterrupted = flat(net)

net, target, sampler = sghmc_chain(noise_seed=7)
for step in range(stop):
    sampler.step(target.closure(*batch(step)))
torch.save({"step": stop, "model": net.state_dict(), "sampler": sampler.state_dict()}, "ckpt.pt")

# A fresh process would rebuild the objects; a different noise seed proves that the
# checkpoint, not the constructor, decides what happens next.
net, target, sampler = sghmc_chain(noise_seed=12345)
checkpoint = torch.load("ckpt.pt")
net.load_state_dict(checkpoint["model"])
sampler.load_state_dict(checkpoint["sampler"])
for step in range(checkpoint["step"], total):
    sampler.step(target.closure(*batch(step)))
print(
    f"\n4. Stopped at step {stop} of {total} and resumed from ckpt.pt: "
    f"same chain bit for bit: {torch.equal(flat(net), uninterrupted)}"
)
Path("ckpt.pt").unlink()

# %% 5. Keep BatchNorm out of the perturbation ------------------------------------------------
# fSGLD evaluates the gradient at theta + sigma * eps. BatchNorm's scale (near 1) and shift
# (near 0) set the scale of every feature after them, and sigma ~ 0.14 moves them by a good
# fraction of that; random-weight-perturbation and SAM practice leaves normalisation layers
# unperturbed. They still get the gradient and the Langevin noise.
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10))
groups = samplers.exclude_from_perturbation(net)  # biases=True would keep biases out too
opt = samplers.FSGLD(groups, lr=0.1, num_data=N, generator=torch.Generator().manual_seed(0))
print(
    "\n5. Param groups:",
    [(len(g["params"]), g["perturb"]) for g in opt.param_groups],
    f"sigma per group: {opt.effective_sigma(0):.4f}, {opt.effective_sigma(1):.4f}",
)

# Look inside one step: which weights differ from their pre-step values while the closure runs?
before = {name: p.detach().clone() for name, p in net.named_parameters()}
closure = Posterior(net, num_data=N, prior=1.0).closure(*batch(0))
moved = {}


def watching_closure() -> torch.Tensor:
    moved.update({n: not torch.equal(p, before[n]) for n, p in net.named_parameters()})
    return closure()


opt.step(watching_closure)
print("   perturbed inside the closure:", [n for n, m in moved.items() if m])
print("   left at their values:        ", [n for n, m in moved.items() if not m])

# The running statistics: a pass at perturbed weights would fold them in. Once the sampler
# watches the model (bayesflat.sample does this for every chain), passes away from theta leave
# them alone; recompute them at a draw's weights before evaluating it, as SWA does.
opt.watch(net)
tracked = int(net[1].num_batches_tracked)
opt.step(Posterior(net, num_data=N, prior=1.0).closure(*batch(1)))
print("   running-statistics updates in a watched step:", int(net[1].num_batches_tracked) - tracked)
update_bn([batch(s)[0] for s in range(N // BATCH)], net)


# %% 6. A new sampler in one class ------------------------------------------------------------
# A sampler is a gradient estimator (where the closure is evaluated) followed by a dynamics
# (what is done with the gradient). fSGLD's coupled perturbation driving SGHMC's momentum:
class FlatSGHMC(samplers.Sampler):
    """SGHMC moved by the gradient at theta + sigma eps, sigma = (T / N)^((1 + eta) / 4).

    v <- (1 - alpha) v - lr grad L_B(theta + sigma eps) + sqrt(2 alpha lr T / N) xi;
    theta <- theta + v.
    """

    name = "flat_sghmc"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        *,
        num_data: int,
        temperature: float = 1.0,
        alpha: float = 0.1,
        sigma: float | None = None,
        eta: float = 0.1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            params,
            estimator=samplers.CoupledPerturbation(),
            dynamics=samplers.SGHMCDynamics(),
            lr=lr,
            num_data=num_data,
            temperature=temperature,
            generator=generator,
            alpha=alpha,
            sigma=sigma,
            eta=eta,
        )


# The composition is exactly the registered fSGHMC, which is built the same way...
def hot_weights(cls, steps: int = 50) -> torch.Tensor:
    torch.manual_seed(0)
    net = models.MLP()
    target = Posterior(net, num_data=N, prior=1.0)
    sampler = cls(net.parameters(), lr=0.05, num_data=N, generator=torch.Generator().manual_seed(0))
    for step in range(steps):
        sampler.step(target.closure(*batch(step)))
    return flat(net)


print(
    f"\n6. FlatSGHMC == samplers.FSGHMC bit for bit: "
    f"{torch.equal(hot_weights(FlatSGHMC), hot_weights(samplers.FSGHMC))}"
)

# ...and once registered it is a first-class method: the driver, traces and reports take it by
# name, and the dynamics' own statistics (here the kinetic temperature) land in sample_stats.
samplers.register(
    "flat_sghmc",
    FlatSGHMC,
    summary="fSGLD's perturbed gradient driving SGHMC dynamics",
    reference="Bruno et al., ICML 2026; Chen, Fox, Guestrin, ICML 2014",
)
trace = bayesflat.sample(
    models.MLP(),
    (x, y),
    sampler="flat_sghmc",
    chains=2,
    burn_in=BURN_IN,
    draws=DRAWS,
    thin=THIN,
    lr=0.05,
    temperature=1.0,
    prior=1.0,
    init="reset",
    alpha=0.1,
    progress=False,
)
stats = trace.sample_stats
print(
    f"   bayesflat.sample(sampler='flat_sghmc'): {stats.sizes['chain']} chains x "
    f"{stats.sizes['draw']} draws, sigma = {float(stats['sigma'].mean()):.4f}, "
    f"kinetic temperature = {float(stats['kinetic_temperature'].mean()):.2f} (target T = 1)"
)
