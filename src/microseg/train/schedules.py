"""Learning-rate schedules as ``LambdaLR`` factors (stepped per optimizer step)."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(
    total: int, warmup: int, floor: float = 0.0, constant: bool = False
) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` at ``total``
    (or, with ``constant``, the full rate after warm-up)."""
    warm = max(0, int(warmup))

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if constant:
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
