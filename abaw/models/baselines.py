"""Baselines: a per-frame linear probe and a causal TCN.

Neither is a published system; they are the floor every architecture here should beat.
``linear`` has no temporal context at all, ``tcn`` adds the locuslab TCN
(Bai et al., arXiv:1803.01271) that the seed systems share.

Shapes: feats[modality] (B, T, D) -> (B, T, 2) valence, arousal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from abaw.models import register_model, resolve_config, single_modality_dims
from abaw.models.tcn import TCN


# --------------------------------------------------------------------------- linear
@dataclass
class LinearConfig:
    modality: str = "visual"  # the one feature stream it reads
    input_dim: int = 768      # any width works; set by input_dims
    dropout: float = 0.0      # on the input features

    SIZES: ClassVar[dict] = {"abaw": {}, "demo": {}}

    @property
    def modalities(self) -> tuple[str, ...]:
        return (self.modality,)

    def with_input_dims(self, input_dims):
        return single_modality_dims(self, input_dims)


class LinearBaseline(nn.Module):
    config_class = LinearConfig
    causal = True  # trivially: no temporal context
    out_dim = 2

    def __init__(self, cfg: LinearConfig):
        super().__init__()
        self.config, self.modalities = cfg, cfg.modalities
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.input_dim, 2)

    def forward(self, feats: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        x = feats[self.config.modality].masked_fill(~mask[..., None], 0.0)  # (B, T, D)
        return self.head(self.dropout(x))                                     # (B, T, 2)


@register_model(LinearBaseline)
def linear(size: str = "abaw", input_dims=None, **overrides) -> LinearBaseline:
    """Per-frame linear regression from one feature stream (no temporal context)."""
    return LinearBaseline(resolve_config(LinearConfig, size, input_dims, overrides))


# --------------------------------------------------------------------------- tcn
@dataclass
class TCNConfig:
    modality: str = "visual"
    input_dim: int = 768                           # MAE ViT-B width; any width works
    channels: tuple[int, ...] = (256, 256, 256, 256)  # 4 blocks, dilations 1, 2, 4, 8
    kernel_size: int = 5                           # receptive field 1 + 2*4*15 = 121 frames
    dropout: float = 0.1
    activation: str = "prelu"

    SIZES: ClassVar[dict] = {"abaw": {}, "demo": {"channels": (32, 32)}}

    @staticmethod
    def search_space(trial, size: str = "abaw") -> dict:
        """Optuna search space over the TCN's sizes (training params are shared)."""
        width = trial.suggest_categorical("tcn_width", [64, 128, 256] if size == "abaw" else [16, 32, 64])
        return {"channels": (width,) * trial.suggest_int("tcn_blocks", 2, 4),
                "kernel_size": trial.suggest_categorical("kernel_size", [3, 5, 7])}

    def __post_init__(self):
        self.channels = tuple(self.channels)

    @property
    def modalities(self) -> tuple[str, ...]:
        return (self.modality,)

    def with_input_dims(self, input_dims):
        return single_modality_dims(self, input_dims)


class TCNBaseline(nn.Module):
    config_class = TCNConfig
    causal = True
    out_dim = 2

    def __init__(self, cfg: TCNConfig):
        super().__init__()
        self.config, self.modalities = cfg, cfg.modalities
        self.tcn = TCN(cfg.input_dim, cfg.channels, cfg.kernel_size, cfg.dropout, cfg.activation)
        self.head = nn.Linear(cfg.channels[-1], 2)

    def forward(self, feats: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        x = feats[self.config.modality].masked_fill(~mask[..., None], 0.0)  # (B, T, D)
        return self.head(self.tcn(x))                                         # (B, T, 2)


@register_model(TCNBaseline)
def tcn(size: str = "abaw", input_dims=None, **overrides) -> TCNBaseline:
    """Causal TCN on one feature stream + linear head."""
    return TCNBaseline(resolve_config(TCNConfig, size, input_dims, overrides))
