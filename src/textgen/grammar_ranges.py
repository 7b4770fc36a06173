"""GBNF for the decimal numbers between two bounds, digit by digit (llama-cpp-python's JSON Schema converter
ignores ``minimum`` and ``maximum``). The bounds' widths are limited (``textgen.limits``), so the rules
stay small: at most a few alternatives per digit."""

from __future__ import annotations

import math
from collections.abc import Iterator

# Digits of an integer part where only one bound is set (the library's integers have at most 16).
MAX_DIGITS = 15


def number_alternatives(lo: float | None, hi: float | None, frac: str | None) -> list[str]:
    """Alternatives generating the numbers in [lo, hi]: integers only when ``frac`` (the rule of a dot and
    decimals) is None. Empty when none is generated."""
    lo_i = None if lo is None else math.ceil(lo)
    hi_i = None if hi is None else math.floor(hi)
    alts: list[str] = []
    if lo_i is None or hi_i is None or lo_i <= hi_i:
        alts.append(_signed_range(lo_i, hi_i))
    if frac is not None:
        # k.f lies in [k, k+1): non-negative k needs k + 1 <= maximum.
        pos_lo = max(lo_i, 0) if lo_i is not None else 0
        pos_hi = None if hi is None else math.floor(hi) - 1
        if pos_hi is None or pos_lo <= pos_hi:
            alts.append(f"({_range(pos_lo, pos_hi)}) {frac}")
        # -k.f lies in (-(k+1), -k]: needs -(k+1) >= minimum and -k <= maximum.
        neg_lo = 0 if hi is None or hi >= 0 else math.ceil(-hi)
        neg_hi = None if lo is None else math.floor(-lo) - 1
        if (lo is None or lo < 0) and (neg_hi is None or neg_lo <= neg_hi):
            alts.append(f'"-" ({_range(neg_lo, neg_hi)}) {frac}')
    return alts


def _range(lo: int, hi: int | None) -> str:
    """GBNF for the decimal numerals of the non-negative integers lo..hi (hi None: unbounded)."""
    if hi is None:
        width = len(str(lo))
        longer = f"[1-9] [0-9]{{{width},{MAX_DIGITS - 1}}}" if width < MAX_DIGITS else ""
        if lo == 0:
            return f'"0" | [1-9] [0-9]{{0,{MAX_DIGITS - 1}}}'
        bounded = _range(lo, 10**width - 1)
        return f"{bounded} | {longer}" if longer else bounded
    alts: list[str] = []
    for width in range(len(str(lo)), len(str(hi)) + 1):
        a = max(lo, 10 ** (width - 1) if width > 1 else 0)
        b = min(hi, 10**width - 1)
        if a <= b:
            alts.extend(_same_width(str(a), str(b)))
    return " | ".join(alts)


def _same_width(a: str, b: str) -> Iterator[str]:
    if len(a) == 1:
        yield _digit(a, b)
        return
    if a[0] == b[0]:
        for rest in _same_width(a[1:], b[1:]):
            yield f'"{a[0]}" ( {rest} )'
        return
    n = len(a) - 1
    if a[1:] == "0" * n and b[1:] == "9" * n:
        yield f"{_digit(a[0], b[0])} [0-9]{{{n}}}"
        return
    for rest in _same_width(a[1:], "9" * n):
        yield f'"{a[0]}" ( {rest} )'
    if int(a[0]) + 1 <= int(b[0]) - 1:
        yield f"{_digit(str(int(a[0]) + 1), str(int(b[0]) - 1))} [0-9]{{{n}}}"
    for rest in _same_width("0" * n, b[1:]):
        yield f'"{b[0]}" ( {rest} )'


def _digit(a: str, b: str) -> str:
    return f'"{a}"' if a == b else f"[{a}-{b}]"


def _signed_range(lo: int | None, hi: int | None) -> str:
    if lo is not None and lo >= 0:
        return _range(lo, hi)
    if hi is not None and hi < 0:
        return f'"-" ( {_range(-hi, None if lo is None else -lo)} )'
    negative = f'"-" ( {_range(1, None if lo is None else -lo)} )'
    return f"{negative} | {_range(0, hi)}"
