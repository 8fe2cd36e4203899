"""MAE features -> causal TCN -> Transformer encoder -> per-frame valence/arousal.

Ling, Lu, Liu, Wang & Zhou, "Boosting Continuous Emotion Recognition with Self-Pretraining using
Masked Autoencoders, Temporal Convolutional Networks, and Transformers", arXiv:2403.11440
(ABAW6, CtyunAI, 3rd place, test CCC 0.564).

    feats["visual"]  (B, T, 768)          frozen MAE ViT-B CLS feature per face frame
    TCN              (B, T, 128)          768 -> 768 -> 256 -> 128, kernel 5, dilations 1, 2, 4, PReLU
    Conv1d k=1       (B, T, 512)
    [+ sinusoidal positional encoding]    off by default, as published
    Transformer x8   (B, T, 512)          4 heads, feed-forward 512, post-norm, padded keys masked
    Linear           (B, T, 256)
    BatchNorm        (B, T, 256)          statistics over real frames only (see below)
    Linear           (B, T, 2)            valence, arousal (no activation after the BN, as published)

Not causal: self-attention sees the whole window.
Parameters at the published config: 20,511,371 (TCN 7,689,097; Conv1d + transformer 12,689,920;
head 132,354), equal to the published code.

Deviations from the published code, on purpose:
- Padded frames are excluded everywhere: attention gets ``src_key_padding_mask`` and the head's
  BatchNorm computes its training-time batch statistics (and updates its running statistics) over
  the real frames only. A plain BatchNorm1d over the flattened (B*T) frames lets the padding of one
  sample shift the normalisation, hence the outputs, of every other sample in the batch.
- ``pos_encoding=True`` adds a parameter-free sinusoidal encoding after the 1x1 conv. The published
  model has none; the causal TCN in front gives the attention some sense of order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from abaw.models import key_padding_mask, register_model, resolve_config, single_modality_dims
from abaw.models.tcn import TCN


@dataclass
class TCNTransformerConfig:
    modality: str = "visual"
    input_dim: int = 768                       # MAE ViT-B CLS feature
    tcn_channels: tuple[int, ...] = (768, 256, 128)  # 3 blocks, dilations 1, 2, 4
    kernel_size: int = 5
    tcn_dropout: float = 0.1                   # not stated in the reference
    activation: str = "prelu"                  # 3 PReLU per block: the +9 in 7,689,097
    d_model: int = 512                         # width after the 1x1 conv
    n_layers: int = 8
    n_heads: int = 4
    ff_dim: int = 512                          # feed-forward width (published: same as d_model)
    dropout: float = 0.1                       # inside the transformer layers
    pos_encoding: bool = False                 # published: none
    head_dim: int = 256                        # Linear(512, 256) -> BN -> Linear(256, 2)

    SIZES: ClassVar[dict] = {
        "abaw": {},
        "demo": {"tcn_channels": (64, 32), "d_model": 64, "n_layers": 1, "n_heads": 2,
                 "ff_dim": 64, "head_dim": 32},
    }

    @staticmethod
    def search_space(trial, size: str = "abaw") -> dict:
        """Optuna search space over this architecture's own sizes (training params are shared)."""
        abaw = size == "abaw"
        widths = {"published": (768, 256, 128), "narrow": (512, 256, 128), "shallow": (256, 128)} if abaw else \
                 {"w32": (64, 32), "w64": (64, 64), "shallow": (32,)}
        d_model = trial.suggest_categorical("d_model", [256, 512] if abaw else [32, 64])
        return {
            "tcn_channels": widths[trial.suggest_categorical("tcn_widths", sorted(widths))],
            "kernel_size": trial.suggest_categorical("kernel_size", [3, 5, 7]),
            "d_model": d_model,
            "ff_dim": d_model,  # published: feed-forward as wide as the model
            "n_layers": trial.suggest_int("n_layers", 2, 8) if abaw else trial.suggest_int("n_layers", 1, 2),
            "n_heads": trial.suggest_categorical("n_heads", [2, 4, 8]),
            "pos_encoding": trial.suggest_categorical("pos_encoding", [False, True]),
        }

    def __post_init__(self):
        self.tcn_channels = tuple(self.tcn_channels)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

    @property
    def modalities(self) -> tuple[str, ...]:
        return (self.modality,)

    def with_input_dims(self, input_dims):
        return single_modality_dims(self, input_dims)


def sinusoidal_encoding(length: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """(T, D) sin/cos table of Vaswani et al. (2017); no parameters."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return pe.to(dtype or torch.float32)


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over the real frames of a (B, T, C) batch.

    Same parameters and buffers as ``nn.BatchNorm1d(C)``. In training mode the batch statistics
    come from real frames only, so padding cannot leak across samples; in eval mode it is the
    usual per-frame affine map with the running statistics.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, T, C), (B, T)
        if (self.training or not self.track_running_stats) and not bool(mask.all()):
            out = x.new_zeros(x.shape)                 # padded frames: 0, never read
            out[mask] = super().forward(x[mask])       # (N_real, C)
            return out
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


class TCNTransformer(nn.Module):
    config_class = TCNTransformerConfig
    causal = False
    out_dim = 2

    def __init__(self, cfg: TCNTransformerConfig):
        super().__init__()
        self.config, self.modalities = cfg, cfg.modalities
        self.tcn = TCN(cfg.input_dim, cfg.tcn_channels, cfg.kernel_size, cfg.tcn_dropout, cfg.activation)
        self.proj = nn.Conv1d(cfg.tcn_channels[-1], cfg.d_model, kernel_size=1)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.ff_dim, cfg.dropout,
                                           batch_first=True)
        # nested tensors would drop padded positions on the eval fast path only; keep one code path
        self.transformer = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.fc = nn.Linear(cfg.d_model, cfg.head_dim)
        self.bn = MaskedBatchNorm1d(cfg.head_dim)
        self.out = nn.Linear(cfg.head_dim, 2)

    def forward(self, feats: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        x = feats[self.config.modality].masked_fill(~mask[..., None], 0.0)  # (B, T, D)
        x = self.tcn(x)                                                       # (B, T, C)
        x = self.proj(x.transpose(1, 2)).transpose(1, 2)                     # (B, T, d_model)
        if self.config.pos_encoding:
            x = x + sinusoidal_encoding(x.shape[1], x.shape[2], x.device, x.dtype)
        x = self.transformer(x, src_key_padding_mask=key_padding_mask(mask))  # (B, T, d_model)
        return self.out(self.bn(self.fc(x), mask))                            # (B, T, 2)


@register_model(TCNTransformer)
def tcn_transformer(size: str = "abaw", input_dims=None, **overrides) -> TCNTransformer:
    """MAE + TCN + Transformer (ABAW6, CtyunAI): visual only, not causal."""
    return TCNTransformer(resolve_config(TCNTransformerConfig, size, input_dims, overrides))
