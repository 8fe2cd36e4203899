"""MAVEN: bi-directional cross-modal attention over visual, audio and text, polar output.

Ahire, Shah, Khan, Pakhale, Sookha, Ganaie & Dhall, "MAVEN: Multi-modal Attention for
Valence-Arousal Emotion Network", CVPR Workshops 2025, arXiv:2503.12623 (ABAW8).

Every modality stays a per-frame sequence; nothing is pooled to one token.

    feats[m]          (B, T, D_m)   visual Swin-B 1024, audio HuBERT 768, text RoBERTa 768
    proj_m            (B, T, 512)   one Linear per modality
    pathways s->m     (B, T, 512)   MultiheadAttention(q = x_m, k = v = x_s), 2 heads, padded keys
                                    masked; 3 modalities -> 6 pathways (v->a, v->t, a->v, a->t, t->v, t->a)
    refine            h_m = x_m + sum_{s != m} attn_{s->m}
    encoder_m         (B, T, 512)   self-attention TransformerEncoder per modality, padded keys masked
    head              (B, T, 2)     cat (1536) -> Linear 512 -> LayerNorm -> ReLU -> Linear 256 -> ReLU
                                    -> Linear 2 = (theta, I)
    output            (B, T, 2)     valence = I cos(theta), arousal = I sin(theta)

Not causal: attention sees the whole window. The losses act on (valence, arousal), never on theta,
so the +-pi wrap of the angle cannot produce a jump in the loss (the published code regresses raw
theta, which does).

Parameter count. The published model (visual 1024, audio 768, text 768; 512-d, 2 heads) has
8,535,810 trainable parameters = projections 1,312,256 + six pathways 6 x 1,050,624 + MLP 918,786
+ 1,024. Its self-attention refinement is a *frozen, pretrained BEiT-3* (outside that count), and
the remaining 1,024 is one 512-wide affine normalisation; the public code does not show where, so
we put a LayerNorm(512) after the head's first Linear. With ``encoder_layers=0`` (no trainable
self-attention) this model has exactly 8,535,810 parameters. We have no BEiT-3 to run on 512-d
fused features, so by default each modality gets one trainable post-norm TransformerEncoderLayer
(2 heads, feed-forward ``encoder_ff``): +3 x 2,102,784 = 14,844,162 parameters at the published
widths with ``encoder_ff=1024``.

Deviations from the published code, on purpose:
- audio and text stay frame sequences (B, T, D) instead of one pooled token per segment, so all six
  pathways attend over time instead of degenerating to a broadcast of one vector;
- every attention gets the key padding mask;
- trainable modality-specific self-attention encoders replace the frozen BEiT-3 (see above);
- no dropout on the attention maps by default (``attn_dropout``; the published rate is not known):
  on CPU it costs more than the attention itself;
- the modality names and the number of modalities are configurable: N modalities give
  N (N - 1) pathways.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from abaw.models import key_padding_mask, register_model, resolve_config


@dataclass
class MavenConfig:
    names: tuple[str, ...] = ("visual", "audio", "text")
    dims: dict[str, int] = field(default_factory=lambda: {
        "visual": 1024,  # Swin-B
        "audio": 768,    # HuBERT base
        "text": 768,     # RoBERTa base on ASR transcripts
    })
    d_model: int = 512
    n_heads: int = 2
    dropout: float = 0.1           # residual, feed-forward and head dropout
    attn_dropout: float = 0.0      # on attention maps (nn.MultiheadAttention's default); a Bernoulli
                                   # draw per map entry triples the CPU cost of the demo model
    encoder_layers: int = 1        # published: frozen BEiT-3 instead; 0 gives the published count
    encoder_ff: int = 1024         # feed-forward width of the per-modality encoder layers
    head_dims: tuple[int, ...] = (512, 256)  # MLP N*d_model -> 512 -> 256 -> 2

    SIZES: ClassVar[dict] = {
        "abaw": {},
        "demo": {"d_model": 64, "n_heads": 2, "encoder_ff": 128, "head_dims": (64, 32)},
    }

    @staticmethod
    def search_space(trial, size: str = "abaw") -> dict:
        """Optuna search space over this architecture's own sizes (training params are shared)."""
        d_model = trial.suggest_categorical("d_model", [256, 512] if size == "abaw" else [32, 64])
        return {
            "d_model": d_model,
            "n_heads": trial.suggest_categorical("n_heads", [1, 2, 4]),
            "encoder_layers": trial.suggest_int("encoder_layers", 0, 2),
            "encoder_ff": 2 * d_model,
        }

    def __post_init__(self):
        self.names = tuple(self.names)
        self.head_dims = tuple(self.head_dims)
        self.dims = dict(self.dims)
        if len(self.names) < 2:
            raise ValueError(f"MAVEN needs at least two modalities, got {self.names}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")

    @property
    def modalities(self) -> tuple[str, ...]:
        return self.names

    def with_input_dims(self, input_dims):
        used = {m: int(d) for m, d in input_dims.items() if m in self.names}
        return dataclasses.replace(self, dims={**self.dims, **used})


def polar_to_va(theta: torch.Tensor, intensity: torch.Tensor) -> torch.Tensor:
    """(..., ), (..., ) -> (..., 2): point on the circumplex at angle theta, radius intensity."""
    return torch.stack([intensity * torch.cos(theta), intensity * torch.sin(theta)], dim=-1)


class Maven(nn.Module):
    config_class = MavenConfig
    causal = False
    out_dim = 2

    def __init__(self, cfg: MavenConfig):
        super().__init__()
        missing = [m for m in cfg.names if m not in cfg.dims]
        if missing:
            raise ValueError(f"no feature width for {missing}; pass input_dims={{{missing[0]!r}: ...}}")
        self.config, self.modalities = cfg, cfg.modalities
        d = cfg.d_model
        self.proj = nn.ModuleDict({m: nn.Linear(cfg.dims[m], d) for m in cfg.names})
        self.pathways = nn.ModuleDict({
            f"{s}_to_{m}": nn.MultiheadAttention(d, cfg.n_heads, dropout=cfg.attn_dropout, batch_first=True)
            for m in cfg.names for s in cfg.names if s != m
        })
        self.encoders = nn.ModuleDict({m: self._encoder(cfg) for m in cfg.names})
        widths = [len(cfg.names) * d, *cfg.head_dims]
        layers: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(w_in, w_out))
            if i == 0:
                layers.append(nn.LayerNorm(w_out))  # the 1,024 extra parameters of the published count
            layers += [nn.ReLU(), nn.Dropout(cfg.dropout)]
        layers.append(nn.Linear(widths[-1], 2))  # (theta, intensity)
        self.head = nn.Sequential(*layers)

    @staticmethod
    def _encoder(cfg: MavenConfig) -> nn.Module:
        if cfg.encoder_layers == 0:
            return nn.Identity()
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, cfg.encoder_ff, cfg.dropout,
                                           batch_first=True)
        layer.self_attn.dropout = cfg.attn_dropout  # the layer uses one rate for everything
        return nn.TransformerEncoder(layer, cfg.encoder_layers, enable_nested_tensor=False)

    def forward(self, feats: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        pad = key_padding_mask(mask)  # (B, T) True = ignore, or None
        keep = mask[..., None]
        x = {m: self.proj[m](feats[m].masked_fill(~keep, 0.0)) for m in self.config.names}  # (B, T, d)
        h = {}
        for m in self.config.names:  # refine m with what every other modality s says about it
            cross = [self.pathways[f"{s}_to_{m}"](x[m], x[s], x[s], key_padding_mask=pad,
                                                  need_weights=False)[0]                # (B, T, d)
                     for s in self.config.names if s != m]
            h[m] = x[m] + sum(cross)
            if not isinstance(self.encoders[m], nn.Identity):
                h[m] = self.encoders[m](h[m], src_key_padding_mask=pad)               # (B, T, d)
        theta, intensity = self.head(torch.cat(list(h.values()), dim=-1)).unbind(-1)  # (B, T) each
        return polar_to_va(theta, intensity)                                          # (B, T, 2)


@register_model(Maven)
def maven(size: str = "abaw", input_dims=None, **overrides) -> Maven:
    """MAVEN (ABAW8): six cross-modal attention pathways over visual/audio/text, polar head."""
    return Maven(resolve_config(MavenConfig, size, input_dims, overrides))
