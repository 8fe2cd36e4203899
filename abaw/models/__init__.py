"""Model registry, timm style.

    from abaw.models import create_model, list_models, model_info
    model = create_model("mamba_va", size="demo", input_dims={"visual": 768})
    out = model(feats, mask)   # feats: {name: (B, T, D_m)}, mask: (B, T) bool, True = real frame
                               # out:   (B, T, 2) valence, arousal (unclipped)

Every model exposes ``modalities`` (tuple of required feature names), ``causal`` (bool: output at
frame t depends on frames <= t only) and ``config`` (its resolved dataclass). Padded frames
(mask False) never change the outputs of real frames; padding is expected on the right.

Two kinds of model (the class attribute ``kind``; ``is_classical(name)``, ``list_models(kind=...)``):

- ``"neural"`` (the default): an ``nn.Module`` as above, trained by epochs on windows;
- ``"classical"``: an estimator fitted on whole videos, sklearn style::

      model = create_model("context_ridge", size="demo", input_dims={"visual": 768})
      model.fit(videos)            # list[VideoRecord] -> self
      pred = model.predict(video)  # (T, 2) float32
      model.save(folder); type(model).load(folder)

  ``abaw.train.FoldTrainer`` fits it once per fold and writes the same prediction files.

``size`` picks a preset: "abaw" = the published defaults (ABAW-sized), "demo" = small enough to
train a fold of the demo data (~50 videos) on 2 CPU cores well within a minute. ``input_dims`` maps modality -> feature
width and wins over the preset's widths; keys for modalities the model does not use are ignored,
so a trainer may pass the widths of every modality it has. ``**overrides`` set config fields.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from torch import Tensor

__all__ = ["create_model", "list_models", "model_info", "register_model", "resolve_config", "is_classical",
           "model_class", "ModelInfo", "SIZES", "KINDS", "key_padding_mask", "single_modality_dims"]

SIZES = ("abaw", "demo")
KINDS = ("neural", "classical")

# name -> (constructor function, model class)
_REGISTRY: dict[str, tuple[Callable[..., Any], type]] = {}


def register_model(model_cls: type):
    """Register a constructor ``fn(size="abaw", input_dims=None, **overrides)`` under its name.

    ``model_cls`` must carry ``config_class`` (a dataclass with a ``SIZES`` preset table, a
    ``modalities`` property and ``with_input_dims``) and ``causal``; ``model_info`` reads those
    without building the (possibly 67M-parameter) model. A classical estimator also sets
    ``kind = "classical"`` (absent: ``"neural"``).
    """
    if _kind(model_cls) not in KINDS:
        raise ValueError(f"{model_cls.__name__}.kind must be one of {KINDS}, got {_kind(model_cls)!r}")

    def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
        if fn.__name__ in _REGISTRY:
            raise ValueError(f"model {fn.__name__!r} is registered twice")
        _REGISTRY[fn.__name__] = (fn, model_cls)
        return fn
    return decorator


def _kind(model_cls: type) -> str:
    return getattr(model_cls, "kind", "neural")


def list_models(kind: str | None = None) -> list[str]:
    """Every registered name, or those of one ``kind`` ("neural" | "classical")."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
    return sorted(name for name, (_, cls) in _REGISTRY.items() if kind is None or _kind(cls) == kind)


def _entry(name: str) -> tuple[Callable[..., Any], type]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def model_class(name: str) -> type:
    """The registered class of ``name`` (e.g. to call a classical model's ``load``)."""
    return _entry(name)[1]


def is_classical(name: str) -> bool:
    """True for an estimator fitted on whole videos (``fit``/``predict``), False for an ``nn.Module``."""
    return _kind(_entry(name)[1]) == "classical"


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
                 **overrides: Any) -> Any:
    """An ``nn.Module`` (neural) or an unfitted estimator (classical) at ``size``."""
    fn, _ = _entry(name)
    return fn(size=size, input_dims=input_dims, **overrides)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    modalities: tuple[str, ...]   # feature streams the forward needs, e.g. ("visual", "audio")
    causal: bool                  # output at frame t depends on frames <= t only
    config: Any                   # the resolved config dataclass
    summary: str                  # first line of the constructor's docstring
    kind: str = "neural"          # "neural" (nn.Module, trained by epochs) | "classical" (fit/predict)


def model_info(name: str, size: str = "abaw", input_dims: Mapping[str, int] | None = None,
               **overrides: Any) -> ModelInfo:
    """What a model needs, without building it."""
    fn, model_cls = _entry(name)
    cfg = resolve_config(model_cls.config_class, size, input_dims, overrides)
    summary = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
    return ModelInfo(name, tuple(cfg.modalities), bool(model_cls.causal), cfg, summary, _kind(model_cls))


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
from . import baselines, context_ridge, leader_follower, mamba_va, maven, tcn_transformer  # noqa: E402,F401
