"""argparse types for counts, sizes and amounts: a bad value is a usage error naming the option
(``argument --batch-size: must be an integer >= 1, got 0``), never a hang or a traceback later."""

from __future__ import annotations

import argparse
import math
from typing import Callable


def integer(minimum: int) -> Callable[[str], int]:
    """An integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def number(minimum: float = 0.0, maximum: float = math.inf, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], float]:
    """A finite float in the interval ``minimum`` .. ``maximum`` (open ends as given)."""
    lo, hi = "(" if low_open else "[", ")" if high_open or maximum == math.inf else "]"
    where = f"> {minimum:g}" if maximum == math.inf and low_open else \
        f">= {minimum:g}" if maximum == math.inf else f"in {lo}{minimum:g}, {maximum:g}{hi}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {where}, got {text!r}") from None
        ok = math.isfinite(value) and (value > minimum if low_open else value >= minimum) \
            and (value < maximum if high_open else value <= maximum)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be a number {where}, got {text}")
        return value

    parse.__name__ = f"number {where}"
    return parse


POSITIVE = integer(1)
NON_NEGATIVE = integer(0)
