"""Schedules: values at known steps, validation, and use as sampler hyperparameters."""

from __future__ import annotations

import math

import pytest
import torch

from bayesflat import schedules
from bayesflat.samplers import SGLD


def test_constant():
    s = schedules.constant(0.25)
    assert [s(t) for t in (0, 1, 1000)] == [0.25, 0.25, 0.25]
    assert s.__name__ == "constant(value=0.25)"
    with pytest.raises(ValueError, match="value"):
        schedules.constant(float("nan"))


def test_polynomial_decay_values():
    s = schedules.polynomial_decay(0.5, b=10.0, gamma=0.55)
    for t in (0, 1, 7, 990):
        assert s(t) == pytest.approx(0.5 * (10.0 + t) ** -0.55, rel=1e-15)
    # gamma = 1: eps_t = a / (b + t) exactly at these points.
    harmonic = schedules.polynomial_decay(2.0, b=1.0, gamma=1.0)
    assert [harmonic(t) for t in (0, 1, 3)] == [2.0, 1.0, 0.5]
    values = [s(t) for t in range(100)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert s.__name__ == "polynomial_decay(a=0.5, b=10.0, gamma=0.55)"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"a": 0.0}, "a must"),
        ({"a": 1.0, "b": -1.0}, "b must"),
        ({"a": 1.0, "gamma": 0.0}, "gamma"),
        ({"a": 1.0, "gamma": 1.5}, "gamma"),
    ],
)
def test_polynomial_decay_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedules.polynomial_decay(**kwargs)


def test_cycle_length_is_ceil():
    assert schedules.cycle_length(100, 4) == 25
    assert schedules.cycle_length(10, 3) == 4
    assert schedules.cycle_length(7, 7) == 1
    with pytest.raises(ValueError, match="cycles"):
        schedules.cycle_length(3, 4)
    with pytest.raises(ValueError, match="total_steps"):
        schedules.cycle_length(0, 1)


def test_cyclical_cosine_at_known_steps():
    # K = 100, M = 4: L = 25. Paper: lr_k = lr0/2 (cos(pi mod(k-1, L)/L) + 1), k = t + 1.
    s = schedules.cyclical_cosine(100, 4, 0.2)
    assert s(0) == 0.2  # start of the first cycle: cos(0) = 1
    assert s(25) == 0.2 and s(50) == 0.2 and s(75) == 0.2  # every restart
    assert s(100) == 0.2  # the pattern repeats beyond K
    end = 0.1 * (math.cos(math.pi * 24 / 25) + 1)
    assert s(24) == pytest.approx(end, rel=1e-14) and s(99) == pytest.approx(end, rel=1e-14)
    assert end == pytest.approx(0.2 * math.pi**2 / (4 * 25**2), rel=0.01)
    even = schedules.cyclical_cosine(40, 2, 1.0)  # L = 20: half-way is cos(pi/2) = 0
    assert even(10) == pytest.approx(0.5, abs=1e-15) and even(30) == pytest.approx(0.5, abs=1e-15)
    values = [s(t) for t in range(25)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))
    assert s.__name__ == "cyclical_cosine(total_steps=100, cycles=4, lr0=0.2)"


def test_cyclical_cosine_uneven_cycles_follow_ceil():
    # K = 10, M = 3: L = ceil(10/3) = 4, so steps 4 and 8 restart.
    s = schedules.cyclical_cosine(10, 3, 1.0)
    assert [t for t in range(10) if s(t) == 1.0] == [0, 4, 8]


def test_cyclical_phase():
    r = schedules.cyclical_phase(100, 4)
    assert [r(t) for t in (0, 1, 20, 24, 25, 49)] == [0.0, 0.04, 0.8, 0.96, 0.0, 0.96]
    # With beta = 0.8, steps 20..24 of every 25-step cycle sample.
    assert [t for t in range(50) if r(t) >= 0.8] == [20, 21, 22, 23, 24, 45, 46, 47, 48, 49]


@pytest.mark.parametrize("step", [-1, 1.5, True])
def test_schedules_reject_bad_steps(step):
    with pytest.raises(ValueError, match="step"):
        schedules.cyclical_cosine(10, 2, 1.0)(step)


def test_schedule_drives_a_sampler_and_is_recorded():
    w = torch.zeros(3, requires_grad=True)
    lr = schedules.polynomial_decay(0.1, b=2.0, gamma=0.6)
    opt = SGLD([w], lr=lr, num_data=10, temperature=0.0)

    def closure():
        loss = (w - 1.0).pow(2).sum() / 2
        loss.backward()
        return loss.detach()

    expected = w.detach().clone()
    for t in range(5):
        opt.step(closure)
        assert opt.stats()["step_size"] == lr(t)
        expected -= lr(t) * (expected - 1.0)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-6, atol=1e-7)
    assert opt.config()["lr"] == "schedule:polynomial_decay(a=0.1, b=2.0, gamma=0.6)"
