"""``VWNConfig``: the one frozen, validated, serializable description of a widening."""

from __future__ import annotations

import dataclasses
import math
import numbers
from fractions import Fraction
from typing import Any

__all__ = ["VWNConfig", "UnsupportedModelError", "parse_ratio", "choose_slots"]

INITS = ("preserve", "paper")
EMBEDDINGS = ("table", "factorized")
# Largest denominator accepted when a float ratio is turned into a fraction (1.5 -> 3/2, 1.25 -> 5/4).
_MAX_DENOMINATOR = 64
# Most slots a widened state may have: each GHC holds n x n carry weights and the state is n*D/m wide, so a
# typo like ratio=1e6 would otherwise try to allocate terabytes. The paper goes up to n = 64.
MAX_SLOTS = 1024


class UnsupportedModelError(ValueError):
    """The model's structure is not one widen() can rewrite; the message says what was expected and found."""


def parse_ratio(ratio: Any) -> Fraction:
    """Turn ``ratio`` (int, float, Fraction or a string like ``"3/2"`` or ``"1.5"``) into a Fraction >= 1.

    >>> parse_ratio("3/2"), parse_ratio(1.5), parse_ratio(8)
    (Fraction(3, 2), Fraction(3, 2), Fraction(8, 1))
    """
    if isinstance(ratio, bool) or ratio is None:
        raise TypeError(
            f"ratio must be an int, float, Fraction or a string like '3/2', got {ratio!r} ({type(ratio).__name__})"
        )
    if isinstance(ratio, str):
        text = ratio.strip()
        try:
            value = Fraction(text)
        except ZeroDivisionError:
            raise ValueError(f"ratio {ratio!r} divides by zero; write a fraction with a non-zero denominator "
                             "like '3/2'") from None
        except ValueError:
            raise ValueError(
                f"ratio {ratio!r} is not a number; write it as an integer, a decimal like '1.5' or a fraction "
                "like '3/2'"
            ) from None
    elif isinstance(ratio, Fraction) or isinstance(ratio, numbers.Integral):
        value = Fraction(ratio)
    elif isinstance(ratio, numbers.Real):
        f = float(ratio)
        if not math.isfinite(f):
            raise ValueError(f"ratio must be a finite number >= 1, got {ratio!r}")
        value = Fraction(f).limit_denominator(_MAX_DENOMINATOR)
        if abs(float(value) - f) > 1e-9 * max(1.0, abs(f)):
            raise ValueError(
                f"ratio {ratio!r} is not a fraction with denominator <= {_MAX_DENOMINATOR}; pass a Fraction or a "
                "string like '3/2' for exact ratios"
            )
    else:
        raise TypeError(f"ratio must be an int, float, Fraction or a string like '3/2', got {type(ratio).__name__}")
    if value < 1:
        raise ValueError(f"ratio must be >= 1 (the over-width state is at least as wide as the backbone), got {ratio!r}")
    return value


def choose_slots(ratio: Any, hidden_size: int, m: int | None = None) -> tuple[int, int]:
    """``(m, n)`` for a ratio: the smallest ``m`` dividing ``hidden_size`` with ``n = ratio*m`` an integer.

    >>> choose_slots("3/2", 64), choose_slots(4, 64), choose_slots(8, 64, m=8)
    ((2, 3), (1, 4), (8, 64))
    """
    r = parse_ratio(ratio)
    if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
        raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
    if m is not None:
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
            raise ValueError(f"m must be a positive integer, got {m!r}")
        m = int(m)
        if hidden_size % m:
            raise ValueError(f"m={m} must divide the hidden size {hidden_size} (slot width = hidden/m)")
        if (r * m).denominator != 1:
            raise ValueError(f"m={m} does not give an integer n = ratio*m for ratio {r} (n would be {float(r * m)}); "
                             f"use a multiple of {r.denominator}")
        return m, int(r * m)
    for cand in range(r.denominator, hidden_size + 1, r.denominator):
        if hidden_size % cand == 0:
            return cand, int(r * cand)
    raise ValueError(
        f"ratio {r} needs m to be a multiple of {r.denominator} that divides the hidden size {hidden_size}; none exists"
    )


@dataclasses.dataclass(frozen=True)
class VWNConfig:
    """How a model is widened (recorded on the widened model as ``model.vwn_config``).

    Args:
        n: number of slots in the over-width state.
        m: number of slots the backbone width is cut into (slot width = hidden/m); ratio r = n/m.
        dynamic: add the input-dependent part of GHC (projection, gates, slot norm).
        init: ``"preserve"`` (the widened model computes what the original did) or ``"paper"``.
        embedding: ``"table"`` (wide table ``[original | extra slots]``) or ``"factorized"`` (``W_expand``).
        group_norm: RMS group norm (groups of the hidden size) before the reduce. ``None`` picks it for
            ``init="paper"`` when the over-width is a multiple of the hidden size, and leaves it out for
            ``init="preserve"``.
        eps: epsilon of the slot RMS norm.
        hidden_size: the backbone width D, filled in by widen().
        mtp: add next-2-token prediction (one extra VWN layer; see :mod:`vwn_transform.mtp`).
        mtp_weight: the loss becomes ``next_token_loss + mtp_weight * next_2_token_loss``.
        recompute: dynamic GHC coefficients are recomputed in the backward instead of stored (less activation
            memory, one more read of the state; eager mode).

    >>> VWNConfig(n=3, m=2).ratio
    Fraction(3, 2)
    """

    n: int
    m: int
    dynamic: bool = True
    init: str = "preserve"
    embedding: str = "table"
    group_norm: bool | None = None
    eps: float = 1e-6
    hidden_size: int | None = None
    mtp: bool = False
    mtp_weight: float = 0.3
    recompute: bool = False

    def __post_init__(self):
        if not isinstance(self.recompute, bool):
            raise ValueError(f"recompute must be True or False, got {self.recompute!r}")
        if not isinstance(self.mtp, bool):
            raise ValueError(f"mtp must be True or False, got {self.mtp!r}")
        if isinstance(self.mtp_weight, bool) or not isinstance(self.mtp_weight, (int, float)) or \
                not (math.isfinite(self.mtp_weight) and self.mtp_weight >= 0):
            raise ValueError(f"mtp_weight must be a finite float >= 0, got {self.mtp_weight!r}")
        for name in ("n", "m"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.n < self.m:
            raise ValueError(f"n must be >= m (ratio n/m >= 1), got n={self.n}, m={self.m}")
        if self.n > MAX_SLOTS:
            raise ValueError(
                f"n={self.n} slots (ratio {self.n}/{self.m}) is more than the {MAX_SLOTS} supported; the paper uses "
                "up to n=64 (ratio 8 with m=8)"
            )
        if not isinstance(self.dynamic, bool):
            raise ValueError(f"dynamic must be True or False, got {self.dynamic!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")
        if self.group_norm is not None and not isinstance(self.group_norm, bool):
            raise ValueError(f"group_norm must be True, False or None, got {self.group_norm!r}")
        if not isinstance(self.eps, (int, float)) or not (self.eps > 0 and math.isfinite(self.eps)):
            raise ValueError(f"eps must be a positive finite float, got {self.eps!r}")
        if self.hidden_size is not None:
            if isinstance(self.hidden_size, bool) or not isinstance(self.hidden_size, int) or self.hidden_size < 1:
                raise ValueError(f"hidden_size must be a positive int or None, got {self.hidden_size!r}")
            if self.hidden_size % self.m:
                raise ValueError(f"m={self.m} must divide hidden_size={self.hidden_size}")

    @property
    def ratio(self) -> Fraction:
        return Fraction(self.n, self.m)

    def use_group_norm(self) -> bool:
        """Whether the reduce applies the RMS group norm (resolves ``group_norm=None``)."""
        if self.group_norm is not None:
            return self.group_norm
        return self.init == "paper" and self.n % self.m == 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VWNConfig":
        if not isinstance(data, dict):
            raise TypeError(f"VWNConfig.from_dict expects a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VWNConfig fields {unknown}; valid fields are {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> "VWNConfig":
        return dataclasses.replace(self, **changes)
