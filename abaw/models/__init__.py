"""Model registry, timm style.

    from abaw.models import create_model, list_models, model_info
    model = create_model("mamba_va", size="demo", input_dims={"visual": 768})
    out = model(feats, mask)   # feats: {name: (B, T, D_m)}, mask: (B, T) bool, True = real frame
                               # out:   (B, T, 2) valence, arousal (unclipped)

Every model exposes ``modalities`` (tuple of required feature names), ``causal`` (bool: output at
frame t depends on frames <= t only) and ``config`` (its resolved dataclass). Padded frames
(mask False) never change the outputs of real frames; padding is expected on the right.

``size`` picks a preset: "abaw" = the published defaults (ABAW-sized), "demo" = small enough to
train a fold of the demo data (~50 videos) on 2 CPU cores well within a minute. ``input_dims`` maps modality -> feature
width and wins over the preset's widths; keys for modalities the model does not use are ignored,
so a trainer may pass the widths of every modality it has. ``**overrides`` set config fields.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import Tensor, nn

__all__ = ["create_model", "list_models", "model_info", "register_model", "resolve_config",
           "ModelInfo", "SIZES", "key_padding_mask", "single_modality_dims"]

SIZES = ("abaw", "demo")

# name -> (constructor function, model class)
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], type[nn.Module]]] = {}


def register_model(model_cls: type[nn.Module]):
    """Register a constructor ``fn(size="abaw", input_dims=None, **overrides)`` under its name.

    ``model_cls`` must carry ``config_class`` (a dataclass with a ``SIZES`` preset table, a
    ``modalities`` property and ``with_input_dims``) and ``causal``; ``model_info`` reads those
    without building the (possibly 67M-parameter) model.
    """
    def decorator(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if fn.__name__ in _REGISTRY:
            raise ValueError(f"model {fn.__name__!r} is registered twice")
        _REGISTRY[fn.__name__] = (fn, model_cls)
        return fn
    return decorator


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _entry(name: str) -> tuple[Callable[..., nn.Module], type[nn.Module]]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def resolve_config(config_cls: type, size: str = "abaw",
                   input_dims: Mapping[str, int] | None = None,
                   overrides: Mapping[str, Any] | None = None):
    """Preset for ``size``, then ``overrides``, then ``input_dims`` -> a validated config."""
    presets = config_cls.SIZES
    if size not in presets:
        raise ValueError(f"unknown size {size!r} for {config_cls.__name__}; choose one of {sorted(presets)}")
    valid = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(overrides or {}) - set(valid))
    if unknown:
        raise TypeError(f"{config_cls.__name__} has no field(s) {unknown}; valid fields: {', '.join(valid)}")
    cfg = config_cls(**{**presets[size], **(overrides or {})})
    return cfg.with_input_dims(input_dims) if input_dims else cfg


def create_model(name: str, size: str = "abaw", input_dims: Mapping[str, int] | None = None,
                 **overrides: Any) -> nn.Module:
    fn, _ = _entry(name)
    return fn(size=size, input_dims=input_dims, **overrides)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    modalities: tuple[str, ...]   # feature streams the forward needs, e.g. ("visual", "audio")
    causal: bool                  # output at frame t depends on frames <= t only
    config: Any                   # the resolved config dataclass
    summary: str                  # first line of the constructor's docstring


def model_info(name: str, size: str = "abaw", input_dims: Mapping[str, int] | None = None,
               **overrides: Any) -> ModelInfo:
    """What a model needs, without building it."""
    fn, model_cls = _entry(name)
    cfg = resolve_config(model_cls.config_class, size, input_dims, overrides)
    summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
    return ModelInfo(name, tuple(cfg.modalities), bool(model_cls.causal), cfg, summary)


def single_modality_dims(cfg, input_dims: Mapping[str, int]):
    """``with_input_dims`` for configs with fields ``modality`` and ``input_dim``."""
    if cfg.modality in input_dims:
        return dataclasses.replace(cfg, input_dim=int(input_dims[cfg.modality]))
    return cfg


def key_padding_mask(mask: Tensor) -> Tensor | None:
    """(B, T) True = real -> (B, T) True = ignore, or None when nothing is padded.

    None lets attention skip the mask arithmetic (same result). A row of padding only would give
    NaN from the softmax; such a row attends to everything instead (its outputs are never read).
    """
    if bool(mask.all()):
        return None
    pad = ~mask
    return pad & ~pad.all(dim=1, keepdim=True)


# Importing the architecture modules registers them (they use register_model above).
from . import baselines, leader_follower, mamba_va, maven, tcn_transformer  # noqa: E402,F401
