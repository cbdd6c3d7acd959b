"""The defaults of a run, shared by :func:`bayesflat.sample` and ``bayesflat run``.

Both read :data:`DEFAULTS`, so a run started from Python with no settings and a run of the
command line with no options sample the same posterior with the same sampler and budget.
The values were chosen on the validation split of the embedded digits (the reference MLP)
by ``benchmarks/default_search.py``; ``benchmarks/results/default_search.md`` has the
search, the criteria and the measured numbers. In short: SGLD on the tempered posterior
``T = 0.1`` with prior ``N(0, 0.4^2)``, step ``lr = 0.5`` (mean-loss units), every chain
started from its own draw of ``N(0, T s^2)``, 1000 burn-in steps then 400 draws 25 steps
apart. A coordinate the data leave to the prior relaxes in ``N s^2 / lr`` steps (about 400
here, 12,930 for the former ``s = 1``, ``lr = 0.1``) and the prior draw starts it at its
stationary law; on the digits the four chains then reach R-hat <= 1.01 and bulk ESS >= 400 on
``lp`` and on the per-draw held-out NLL.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["DEFAULTS", "SAMPLE_ARGUMENTS", "RunDefaults", "resolve_temperature", "sample_defaults"]


@dataclass(frozen=True)
class RunDefaults:
    """Settings of a run that is given none.

    Attributes
    ----------
    sampler : str
        Registry name of the sampler.
    chains : int
        Independent chains (R-hat needs at least 4).
    burn_in : int
        Steps discarded at the start of every chain.
    draws : int
        Draws kept per chain.
    thin : int
        Steps between kept draws.
    batch_size : int
        Minibatch size ``|B|``.
    seed : int
        Root seed.
    lr : float
        Step size in mean-loss units (DESIGN.md, section 1): the update moves ``theta`` by
        ``-lr * grad L_B`` plus noise of variance ``2 lr T / N``.
    temperature : float
        ``T`` of a sampler given none (an optimiser always runs at ``T = 0``); see
        :func:`resolve_temperature`.
    prior_scale : float
        Standard deviation ``s`` of the isotropic Gaussian prior ``N(0, s^2 I)`` (weight units;
        weight decay ``1 / (N s^2)`` in mean-loss units).
    init : str
        How every chain starts (see :func:`bayesflat.sample`).
    model : str
        Reference network of ``bayesflat run`` (:func:`bayesflat.models.build_model`).
    val_size : float
        Fraction of the digits training split held out for validation by ``bayesflat run``.
    configurational_temperature : bool
        Whether ``bayesflat run`` records ``theta . grad L`` of the full-data potential at
        every kept draw (``sample_stats.theta_dot_grad``; one gradient over the training set
        per draw), from which ``T_conf = N <theta . grad L> / d`` is estimated.
    """

    sampler: str = "sgld"
    chains: int = 4
    burn_in: int = 1000
    draws: int = 400
    thin: int = 25
    batch_size: int = 64
    seed: int = 0
    lr: float = 0.5
    temperature: float = 0.1
    prior_scale: float = 0.4
    init: str = "prior"
    model: str = "mlp"
    val_size: float = 0.1
    configurational_temperature: bool = True


DEFAULTS = RunDefaults()
"""The defaults of :func:`bayesflat.sample` and ``bayesflat run``."""

SAMPLE_ARGUMENTS: dict[str, str] = {
    "sampler": "sampler",
    "chains": "chains",
    "burn_in": "burn_in",
    "draws": "draws",
    "thin": "thin",
    "batch_size": "batch_size",
    "seed": "seed",
    "lr": "lr",
    "prior_scale": "prior",
    "init": "init",
}
"""Field of :class:`RunDefaults` -> keyword of :func:`bayesflat.sample` it is the default of.

``temperature`` is not among them: :func:`bayesflat.sample` takes ``temperature=None`` and
resolves it with :func:`resolve_temperature`, since an optimiser's is 0 whatever the default.
"""


def sample_defaults(defaults: RunDefaults = DEFAULTS) -> dict[str, Any]:
    """The keywords of :func:`bayesflat.sample` that ``defaults`` sets, by keyword name."""
    values = asdict(defaults)
    return {keyword: values[field] for field, keyword in SAMPLE_ARGUMENTS.items()}


def resolve_temperature(
    temperature: float | None, is_sampler: bool, *, states_posterior: bool = False
) -> float | None:
    """The temperature of a run: ``temperature`` if given, else the default of its kind.

    Parameters
    ----------
    temperature : float or None
        ``T`` as given by the user; ``None`` asks for the default.
    is_sampler : bool
        Whether the method samples (``True``) or optimises (registry ``is_sampler``).
    states_posterior : bool, default False
        Whether the target states its own prior and likelihood (a Pyro model): the run
        default ``DEFAULTS.temperature`` belongs to the default network and its prior, and
        sampling anything but the posterior such a model states would need asking for.

    Returns
    -------
    float
        ``temperature`` when not ``None``; otherwise ``1`` for a sampler of a target that
        states its posterior, ``DEFAULTS.temperature`` for any other sampler and ``0`` for an
        optimiser (its noise-free limit, DESIGN.md section 1).
    """
    if temperature is not None:
        return temperature
    if not is_sampler:
        return 0.0
    return 1.0 if states_posterior else DEFAULTS.temperature
