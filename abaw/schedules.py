"""Learning-rate schedules shared by the trainers (folds in ``train.py``, pretraining in ``pretrain/``)."""
from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up to the base rate, then cosine decay to zero, per optimizer step (a LambdaLR factor)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor
