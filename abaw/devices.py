"""Which torch device a command runs on: a shared helper (training, extraction)."""
from __future__ import annotations

import torch


def resolve_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {requested} asked for CUDA, but torch sees no GPU (use --device cpu or auto)")
    return device
