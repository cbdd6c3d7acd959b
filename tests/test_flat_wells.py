"""Flat-minimum methods end in the flat one of two equally deep wells more often than SGD/SGLD.

The potential, in mean-loss units, on ``(x, y)``:

    f(x, y) = h (x^2 - 1)^2 + k(x) y^2 / 2,      k(x) = k0 exp(-c x)

has two minima at ``(±1, 0)`` with ``f = 0``: a sharp one (curvature ``k_s = k(-1) = 50`` across
the valley, width ``w_s = k_s^(-1/2) = 0.14``) and a flat one (``k_f = k(1) = 2``,
``w_f = 0.71``), separated by a barrier ``h = 0.1`` along the valley ``y = 0``. From the same
random starts, plain gradient descent and SGLD end in whichever basin they start in.

Hyperparameters are set from each method's theory, relative to the wells' widths and curvatures:

- Random smoothing (fSGLD, NSO, RWP). In closed form
  ``E f(x + s e1, y + s e2) = h [(x^2 - 1)^2 + s^2 (6 x^2 - 2) + 3 s^4]
  + k(x) exp(c^2 s^2 / 2) (y^2 + s^2) / 2``: along the valley the smoothing adds the tilt
  ``s^2 k(x) exp(c^2 s^2 / 2) / 2``, which removes the sharp basin once its slope beats the
  barrier's restoring force, ``s > s_c`` (computed below, ``≈ 0.09``). The radius is the
  geometric mean of the two widths, ``r = (w_s w_f)^(1/2) = 0.32``: above ``s_c``, inside the
  flat well. fSGLD uses the paper's coupling ``sigma = (T/N)^((1 + eta)/4)`` at
  ``T/N = 1/80`` (``sigma = 0.30 ≈ r``); at that temperature the barrier is ``8 T/N``, too high
  for SGLD to cross within the run.
- SAM minimises ``max_{||e|| <= rho} f(theta + e) ≈ f + rho^2 lambda_max / 2``: the same tilt
  with ``lambda_max = k(x)``; ``rho = r``.
- Escape: the perturbed gradient ``grad f(theta + rho u)`` carries the smoothing drift and
  kicks ``rho P^perp H u`` that scale with the curvature; ``rho = r``, and ``eps0 = 1`` exceeds
  the largest gradient on the valley floor, ``max |d/dx h (x^2 - 1)^2| = 8 h / (3 sqrt 3)
  = 0.15``, so the perturbation is active all along the valley between the wells.
- Averaged SGD / SWA: a constant step ``lr`` makes a minimum linearly unstable when
  ``lr lambda_max > 2``. ``lr = 0.06 = 1.5 * 2 / k_s`` destabilises the sharp well and keeps the
  flat one (``lr max(k_f, 8 h) = 0.12``); the gradients carry unit-variance noise (SGD's
  minibatch noise) and the average runs over the second half of the run. Its baseline is SGD
  with the same noisy gradients at the ordinary step ``0.01``.

Each proportion of runs ending in the flat basin (``x > 0``) is compared with the baseline's by
a one-sided two-proportion z-test (pooled binomial standard error) at level ``1e-4``. Methods
whose step uses a global gradient norm (SAM, escape) run as separate optimisers over the first
``LOOP_RUNS`` starts; the others run all starts as the rows of one parameter.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from harness import z_bound

from bayesflat import samplers

H, K0, C = 0.1, 10.0, math.log(25.0) / 2
K_SHARP, K_FLAT = K0 * math.exp(C), K0 * math.exp(-C)
RADIUS = (K_SHARP * K_FLAT) ** -0.25
TEMPERATURE, NUM_DATA = 1.0, 80
LR, STEPS = 0.01, 600
RUNS = 400
LOOP_RUNS, LOOP_STEPS = 24, 300  # a Python loop over separate optimisers costs K times more


def potential(w: torch.Tensor) -> torch.Tensor:
    """``f`` per row of ``w`` (``(K, 2)``)."""
    x, y = w[:, 0], w[:, 1]
    return H * (x**2 - 1) ** 2 + 0.5 * K0 * torch.exp(-C * x) * y**2


def starts() -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(
        np.stack([rng.uniform(-1.4, 1.4, RUNS), rng.uniform(-0.3, 0.3, RUNS)], axis=1)
    )


def closure_for(w: torch.Tensor, noise: torch.Generator | None = None):
    def closure() -> torch.Tensor:
        loss = potential(w).sum()
        if noise is not None:
            loss = loss + (w * torch.randn(w.shape, generator=noise, dtype=w.dtype)).sum()
        loss.backward()
        return loss.detach()

    return closure


def run_rows(
    name: str, *, lr: float = LR, noise: bool = False, temperature: float = 0.0, **options
) -> np.ndarray:
    """``RUNS`` independent runs as the rows of one parameter; final ``x`` per run."""
    w = starts().clone().requires_grad_(True)
    opt = samplers.get(name)(
        [w],
        lr=lr,
        num_data=NUM_DATA,
        temperature=temperature,
        generator=torch.Generator().manual_seed(1),
        **options,
    )
    closure = closure_for(w, torch.Generator().manual_seed(2) if noise else None)
    for _ in range(STEPS):
        opt.step(closure)
    if name == "swa":
        return opt.average()[0][:, 0].numpy()
    return w.detach()[:, 0].numpy()


def run_loop(name: str, **options) -> np.ndarray:
    """Separate optimisers for the first ``LOOP_RUNS`` starts: SAM's and escape's global
    gradient norm (and escape's projection) would couple rows of one parameter."""
    finals = []
    for i, start in enumerate(starts()[:LOOP_RUNS]):
        w = start.clone().reshape(1, 2).requires_grad_(True)
        opt = samplers.get(name)(
            [w],
            lr=LR,
            num_data=NUM_DATA,
            temperature=0.0,
            generator=torch.Generator().manual_seed(i),
            **options,
        )
        closure = closure_for(w)
        for _ in range(LOOP_STEPS):
            opt.step(closure)
        finals.append(float(w.detach()[0, 0]))
    return np.array(finals)


def critical_sigma() -> float:
    """Smallest ``s`` whose smoothed tilt beats the smoothed barrier on ``[-1, 0]``."""
    x = np.linspace(-1.0, 0.0, 2001)

    def margin(s: float) -> float:
        tilt = C * s**2 / 2 * K0 * np.exp(C**2 * s**2 / 2) * np.exp(-C * x)
        restoring = 4 * H * x * (x**2 - 1 + 3 * s**2)
        return float(np.min(tilt - restoring))

    lo, hi = 1e-3, RADIUS
    assert margin(lo) < 0 < margin(hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if margin(mid) < 0 else (lo, mid)
    return hi


def assert_more_often_flat(method: np.ndarray, baseline: np.ndarray, label: str) -> None:
    a, b = np.sum(method > 0), np.sum(baseline > 0)
    n, m = method.size, baseline.size
    pooled = (a + b) / (n + m)
    z = (a / n - b / m) / math.sqrt(pooled * (1 - pooled) * (1 / n + 1 / m))
    bound = z_bound(1, alpha=2e-4)  # two-sided 2e-4: the one-sided 1e-4 quantile
    assert z > bound, (
        f"{label}: flat in {a}/{n} runs vs baseline {b}/{m}; z = {z:.2f} <= {bound:.2f}"
    )


@pytest.fixture(scope="module")
def baselines() -> dict[str, np.ndarray]:
    sgd = run_rows("sgd")
    sgld = run_rows("sgld", temperature=TEMPERATURE)
    return {"sgd": sgd, "sgld": sgld}


def test_setup_matches_the_theory(baselines):
    assert K_SHARP == pytest.approx(50.0) and K_FLAT == pytest.approx(2.0)
    s_c = critical_sigma()
    coupled = samplers.coupled_sigma(TEMPERATURE, NUM_DATA)
    assert s_c < coupled < K_FLAT**-0.5 and s_c < RADIUS < K_FLAT**-0.5
    assert 1.0 > 8 * H / (3 * math.sqrt(3))
    assert 2 / K_SHARP < 0.06 and 0.06 * max(K_FLAT, 8 * H) < 2
    # Both baselines end in the basin they start in: about half the starts are flat.
    for name, finals in baselines.items():
        assert np.all(np.isfinite(finals)), name
        assert 0.3 < np.mean(finals > 0) < 0.7, name


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("fsgld", {"temperature": TEMPERATURE}),
        ("nso", {"sigma": RADIUS}),
        ("rwp", {"sigma": RADIUS}),
    ],
)
def test_smoothing_methods_find_the_flat_well(baselines, name, kwargs):
    finals = run_rows(name, **kwargs)
    for base, values in baselines.items():
        assert_more_often_flat(finals, values, f"{name} vs {base}")


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("sam", {"rho": RADIUS}),
        ("escape", {"rho": RADIUS, "eps0": 1.0}),
    ],
)
def test_sharpness_methods_find_the_flat_well(baselines, name, kwargs):
    finals = run_loop(name, **kwargs)
    for base, values in baselines.items():
        assert_more_often_flat(finals, values, f"{name} vs {base}")


def test_averaged_large_step_sgd_finds_the_flat_well():
    sgd = run_rows("sgd", noise=True)
    swa = run_rows("swa", lr=0.06, noise=True, start=STEPS // 2)
    assert np.all(np.isfinite(swa))
    assert_more_often_flat(swa, sgd, "swa vs noisy sgd")
