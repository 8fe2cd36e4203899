"""Mamba-VA: MAE features -> causal TCN -> Mamba stack -> per-frame valence/arousal.

Liang, Wang, Liu, Liu & Yao, "Mamba-VA: A Mamba-based Approach for Continuous Emotion Recognition
in Valence-Arousal Space", arXiv:2503.10104 (ABAW8; code: github.com/FreedomPuppy77/Charon).

    feats["visual"]  (B, T, 1024)   frozen MAE ViT-L CLS feature per face frame
    TCN              (B, T, 256)    1024 -> 1024 -> 768 -> 512 -> 256, kernel 15, dilations 1..8, PReLU
    normalise        (B, T, 256)    each frame over its features, no parameters
    4 x Mamba        (B, T, 256)    x = LayerNorm(Mamba(x) + x); d_state 8, d_conv 4, expand 1
    Linear           (B, T, 256)
    head             (B, T, 2)      Linear(256, 128) -> ReLU -> Linear(128, 2): valence, arousal

Causal end to end: TCN and Mamba only look back, everything else is per frame. Padding must be
on the right (as the collate does); then padded frames cannot reach any real frame.
Receptive field of the TCN alone: 1 + 2*14*15 = 421 frames; Mamba's state reaches further.

Parameters at the published config: 67,155,086 (TCN 66,203,148; Mamba stack 918,784 = 4 x 212,736
Mamba + 4 x 512 LayerNorm + 65,792 Linear; head 33,154), equal to the published code (which
also builds a LayerNorm "adaptor" that its forward never uses; we drop it).

Deviations from the published code, on purpose:
- Mamba's A_log, D and dt_proj keep the initialisation of the Mamba paper (S4D-real A, dt
  log-uniform in [1e-3, 1e-1]); the published code re-initialises A_log ~ N(0, 0.01) and dt_proj ~
  N(0, 0.02), which makes every state decay alike and removes the multi-timescale memory.
- "normalise" is ``F.layer_norm`` without affine; the published ``InstanceNorm1d`` applied to a
  (B, T, D) tensor computes the same thing (per frame, over features, eps 1e-5).
- d_model is not a separate knob: it is the TCN's last width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from abaw.models import register_model, resolve_config, single_modality_dims
from abaw.models.mamba import Mamba
from abaw.models.tcn import TCN


@dataclass
class MambaVAConfig:
    modality: str = "visual"
    input_dim: int = 1024                            # MAE ViT-L CLS feature
    tcn_channels: tuple[int, ...] = (1024, 768, 512, 256)  # last width = Mamba d_model
    kernel_size: int = 15
    tcn_dropout: float = 0.2                         # published configs: 0.2-0.3
    activation: str = "prelu"                        # 3 PReLU per block: the +12 in 66,203,148
    n_layers: int = 4
    d_state: int = 8
    d_conv: int = 4
    expand: int = 1
    head_hidden: int = 128                           # Linear(256, 128) -> ReLU -> Linear(128, 2)

    SIZES: ClassVar[dict] = {
        "abaw": {},
        "demo": {"tcn_channels": (64, 64), "kernel_size": 5, "n_layers": 2, "head_hidden": 32},
    }

    @staticmethod
    def search_space(trial, size: str = "abaw") -> dict:
        """Optuna search space over this architecture's own sizes (training params are shared)."""
        widths = {"abaw": {"published": (1024, 768, 512, 256), "narrow": (512, 384, 256, 256),
                           "wide_out": (1024, 768, 512, 384)},
                  "demo": {"w32": (64, 32), "w64": (64, 64), "w96": (96, 96)}}[size]
        return {
            "tcn_channels": widths[trial.suggest_categorical("tcn_widths", sorted(widths))],
            "kernel_size": trial.suggest_categorical("kernel_size", [5, 9, 15] if size == "abaw" else [3, 5, 9]),
            "d_state": trial.suggest_categorical("d_state", [4, 8, 16]),
            "n_layers": trial.suggest_int("n_layers", 2, 6) if size == "abaw" else trial.suggest_int("n_layers", 1, 3),
        }

    def __post_init__(self):
        self.tcn_channels = tuple(self.tcn_channels)

    @property
    def modalities(self) -> tuple[str, ...]:
        return (self.modality,)

    def with_input_dims(self, input_dims):
        return single_modality_dims(self, input_dims)


class ResidualMamba(nn.Module):
    """x = LayerNorm(Mamba(x) + x) -- post-norm, as published."""

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int):
        super().__init__()
        self.mamba = Mamba(d_model, d_state=d_state, d_conv=d_conv, expand=expand)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        return self.norm(self.mamba(x) + x)


class MambaVA(nn.Module):
    config_class = MambaVAConfig
    causal = True
    out_dim = 2

    def __init__(self, cfg: MambaVAConfig):
        super().__init__()
        self.config, self.modalities = cfg, cfg.modalities
        d = cfg.tcn_channels[-1]
        self.tcn = TCN(cfg.input_dim, cfg.tcn_channels, cfg.kernel_size, cfg.tcn_dropout, cfg.activation)
        self.layers = nn.ModuleList(
            [ResidualMamba(d, cfg.d_state, cfg.d_conv, cfg.expand) for _ in range(cfg.n_layers)])
        self.proj = nn.Linear(d, d)
        self.head = nn.Sequential(nn.Linear(d, cfg.head_hidden), nn.ReLU(), nn.Linear(cfg.head_hidden, 2))

    def forward(self, feats: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        x = feats[self.config.modality].masked_fill(~mask[..., None], 0.0)  # (B, T, D_in)
        x = self.tcn(x)                                                       # (B, T, d)
        x = F.layer_norm(x, x.shape[-1:])
        for layer in self.layers:
            x = layer(x)                                                      # (B, T, d)
        return self.head(self.proj(x))                                        # (B, T, 2)


@register_model(MambaVA)
def mamba_va(size: str = "abaw", input_dims=None, **overrides) -> MambaVA:
    """Mamba-VA (ABAW8): causal TCN + 4 residual Mamba layers, visual only, causal."""
    return MambaVA(resolve_config(MambaVAConfig, size, input_dims, overrides))
