"""Audio-visual leader-follower attentive fusion.

Zhang, Ding, Wei & Guan, "Continuous Emotion Recognition with Audio-visual Leader-follower
Attentive Fusion", ICCV Workshops 2021, pp. 3567-3574, arXiv:2107.01175 (ABAW2; code: github.com/sucv/ABAW2).

The visual stream leads; each audio stream follows, and the fusion lets the leader decide per
frame how much of each follower to use. Any number of followers (VGGish, MFCC, eGeMAPS, ...).

    feats[leader]      (B, T, D_l)  ->  leader TCN 4 x 128, k5   ->  (B, T, 128)
    feats[follower_j]  (B, T, D_j)  ->  follower TCN 4 x 32, k5  ->  (B, T, 32)     one per follower
    per frame, the N = 1 + n_followers branch outputs are N tokens:
        q, k, v = Linear_m(branch_m)                               (B, T, N, 32) each
        z = LayerNorm_(N, 32)(softmax(q k^T / sqrt(32)) v + v)     (B, T, N, 32)
    Linear(cat[leader (128), z flattened (N*32)])                  (B, T, 2)   or (B, T, 1)

Causal (TCNs are causal, attention is across modalities within one frame). ReLU activations.
Parameters at the published config (visual 512, VGGish 128, MFCC 39; single target): 1,092,801 =
visual TCN 968,832 + audio TCNs 104,832 + fusion 18,912 (q/k/v 18,720 + LayerNorm over the
(3, 32) token block 192) + regressor 225. Equal to the published code.

Deviations from the published code:
- Joint output by default: one model predicts valence and arousal, (B, T, 2). The paper trained
  one model per dimension; ``single_target="valence"`` (or "arousal") reproduces that and then the
  forward returns (B, T, 1) -- ``model.out_dim`` says which. A trainer using the (B, T, 2)
  interface should keep the default.
- The published attention computes softmax(K Q^T) V (query and key roles swapped in the code);
  we write the usual softmax(Q K^T) V. Same parameters, same family of functions.
- Follower widths and names come from config / ``input_dims`` instead of a hard-coded table.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
from torch import nn

from abaw.models import register_model, resolve_config
from abaw.models.tcn import TCN

TARGETS = ("valence", "arousal")


@dataclass
class LeaderFollowerConfig:
    leader: str = "visual"                       # the leading (visual) stream
    followers: tuple[str, ...] = ("audio",)      # every other stream: one TCN each
    dims: dict[str, int] = field(default_factory=lambda: {
        "visual": 512,   # IR-ResNet-50 face embedding
        "audio": 128,    # VGGish
    })
    leader_channels: tuple[int, ...] = (128, 128, 128, 128)
    follower_channels: tuple[int, ...] = (32, 32, 32, 32)
    kernel_size: int = 5
    dropout: float = 0.1                         # inside the TCNs
    activation: str = "relu"                     # no PReLU: the published count has none
    attn_dim: int = 32                           # q/k/v width per modality token
    single_target: Optional[str] = None          # None: joint (B, T, 2); "valence"/"arousal": (B, T, 1)

    SIZES: ClassVar[dict] = {
        "abaw": {},
        "demo": {"leader_channels": (32, 32), "follower_channels": (16, 16), "attn_dim": 16},
    }

    @staticmethod
    def search_space(trial, size: str = "abaw") -> dict:
        """Optuna search space over this architecture's own sizes (training params are shared)."""
        scale = 1 if size == "abaw" else 4  # the demo preset is about 4x narrower
        leader = trial.suggest_categorical("leader_width", [64, 128, 256]) // scale
        follower = trial.suggest_categorical("follower_width", [16, 32, 64]) // min(scale, 2)
        blocks = trial.suggest_int("tcn_blocks", 2, 4)
        return {
            "leader_channels": (leader,) * blocks,
            "follower_channels": (follower,) * blocks,
            "kernel_size": trial.suggest_categorical("kernel_size", [3, 5, 7]),
            "attn_dim": trial.suggest_categorical("attn_dim", [16, 32, 64]),
        }

    def __post_init__(self):
        self.followers = tuple(self.followers)
        self.leader_channels = tuple(self.leader_channels)
        self.follower_channels = tuple(self.follower_channels)
        self.dims = dict(self.dims)
        if self.leader in self.followers:
            raise ValueError(f"leader {self.leader!r} is also listed as a follower")
        if self.single_target not in (None, *TARGETS):
            raise ValueError(f"single_target must be None or one of {TARGETS}, not {self.single_target!r}")

    @property
    def modalities(self) -> tuple[str, ...]:
        return (self.leader, *self.followers)

    def with_input_dims(self, input_dims):
        used = {m: int(d) for m, d in input_dims.items() if m in self.modalities}
        return dataclasses.replace(self, dims={**self.dims, **used})


class ModalityAttention(nn.Module):
    """Per-frame attention across the N modality tokens, residual on v, LayerNorm over (N, d)."""

    def __init__(self, widths: dict[str, int], attn_dim: int):
        super().__init__()
        self.attn_dim = attn_dim
        # one Linear to q|k|v per branch: same parameter count as three separate Linears
        self.to_qkv = nn.ModuleDict({m: nn.Linear(w, 3 * attn_dim) for m, w in widths.items()})
        self.norm = nn.LayerNorm([len(widths), attn_dim])

    def forward(self, branches: dict[str, torch.Tensor]) -> torch.Tensor:  # {m: (B, T, W_m)}
        qkv = torch.stack([self.to_qkv[m](h) for m, h in branches.items()], dim=-2)  # (B, T, N, 3d)
        q, k, v = qkv.split(self.attn_dim, dim=-1)                                    # (B, T, N, d)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.attn_dim), dim=-1)  # (B, T, N, N)
        return self.norm(w @ v + v).flatten(-2)                                       # (B, T, N*d)


class LeaderFollower(nn.Module):
    config_class = LeaderFollowerConfig
    causal = True

    def __init__(self, cfg: LeaderFollowerConfig):
        super().__init__()
        missing = [m for m in cfg.modalities if m not in cfg.dims]
        if missing:
            raise ValueError(f"no feature width for {missing}; pass input_dims={{{missing[0]!r}: ...}}")
        self.config, self.modalities = cfg, cfg.modalities
        self.out_dim = 1 if cfg.single_target else 2

        def tcn(m, channels):
            return TCN(cfg.dims[m], channels, cfg.kernel_size, cfg.dropout, cfg.activation)

        self.tcns = nn.ModuleDict({cfg.leader: tcn(cfg.leader, cfg.leader_channels)})
        self.tcns.update({m: tcn(m, cfg.follower_channels) for m in cfg.followers})
        self.fusion = ModalityAttention({m: t.out_dim for m, t in self.tcns.items()}, cfg.attn_dim)
        fused = cfg.leader_channels[-1] + len(cfg.modalities) * cfg.attn_dim
        self.regressor = nn.Linear(fused, self.out_dim)

    def forward(self, feats: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        keep = mask[..., None]
        branches = {m: tcn(feats[m].masked_fill(~keep, 0.0)) for m, tcn in self.tcns.items()}
        fused = self.fusion(branches)                                       # (B, T, N*d)
        leader = branches[self.config.leader]                               # (B, T, 128)
        return self.regressor(torch.cat([leader, fused], dim=-1))           # (B, T, out_dim)


@register_model(LeaderFollower)
def leader_follower(size: str = "abaw", input_dims=None, **overrides) -> LeaderFollower:
    """Leader-follower attentive fusion (ABAW2): visual leader + one TCN per audio stream, causal."""
    return LeaderFollower(resolve_config(LeaderFollowerConfig, size, input_dims, overrides))
