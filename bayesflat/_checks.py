"""Argument checks shared by every module: one wording for every refusal.

Each check returns the normalised value or raises ``ValueError`` whose message names the
argument as the caller spells it (``argname``) and says what would be accepted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "check_bool",
    "check_choice",
    "check_int",
    "check_positive",
    "validate_num_data",
    "validate_temperature",
]


def check_int(value: object, argname: str, minimum: int = 0, maximum: int | None = None) -> int:
    """Return ``value`` as an ``int`` in ``[minimum, maximum]``; bools are refused."""
    bad = isinstance(value, bool) or not isinstance(value, int | np.integer)
    if not bad and maximum is not None and value > maximum:
        raise ValueError(f"{argname} must be an integer <= {maximum}, got {value!r}")
    if bad or value < minimum:
        raise ValueError(f"{argname} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_positive(value: object, argname: str, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a finite float ``> 0`` (``>= 0`` with ``allow_zero``)."""
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{argname} must be a finite number {bound}, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{argname} must be a finite number {bound}, got {value!r}")
    return v


def check_bool(value: object, argname: str) -> bool:
    """Return ``value`` if it is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise ValueError(f"{argname} must be True or False, got {value!r}")
    return value


def check_choice(value: Any, argname: str, choices: Sequence[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``."""
    try:
        ok = value in choices
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{argname} must be one of {tuple(choices)}, got {value!r}")
    return value


def validate_num_data(num_data: object) -> int:
    """Return ``num_data`` as an ``int`` after checking it is a positive integer.

    Raises
    ------
    ValueError
        If ``num_data`` is not a positive integer (bools and non-integral floats are refused).
    """
    if isinstance(num_data, bool) or not isinstance(num_data, int | float | np.integer):
        raise ValueError(
            f"num_data must be a positive integer (the training-set size N), got {num_data!r}"
        )
    if isinstance(num_data, float) and not num_data.is_integer():
        raise ValueError(f"num_data must be a positive integer, got the non-integral {num_data!r}")
    if num_data < 1:
        raise ValueError(f"num_data must be a positive integer (N >= 1), got {num_data!r}")
    return int(num_data)


def validate_temperature(temperature: object) -> float:
    """Return ``temperature`` as a ``float`` after checking ``0 <= T < inf``.

    Raises
    ------
    ValueError
        If ``temperature`` is negative, NaN, infinite or not a number.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, int | float | np.floating):
        raise ValueError(
            f"temperature must be a finite number >= 0 (1 = Bayes posterior), got {temperature!r}"
        )
    t = float(temperature)
    if not math.isfinite(t) or t < 0:
        raise ValueError(
            f"temperature must be a finite number >= 0 (1 = Bayes posterior, 0 = optimiser), "
            f"got {temperature!r}"
        )
    return t
