"""The resolved run configuration: defaults < YAML file (``--config``) < command-line flags.

Every option of ``run_cv.py`` lives here, so a saved ``config.yaml`` reproduces a run exactly.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


@dataclass
class RunConfig:
    data_root: str | None = None  # None: the built-in demo dataset (generated on first use)
    test_list: str | None = None  # default: found at the data root by pattern
    test_sample: str | None = None
    subjects: str | None = None  # CSV video,subject replacing the default subject rule (abaw.subjects)
    # The default zoo: a temporal network and a classical context model, merged by `auto` (README
    # "Defaults"): on data nobody tuned for, one of the two is often much the better, per dimension.
    arch: list[str] = field(default_factory=lambda: ["mamba_va", "context_ridge"])
    size: str = "demo"  # model preset: "demo" (fast on CPU) or "abaw" (published sizes)
    model: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-arch config overrides
    folds: int = 5
    fold_mode: str = "grouped"  # "grouped" | "val_fold" (original validation set = one fold) | "holdout_val"
    # 16 epochs, patience 6: at 8 epochs every demo fold was still improving at its last epoch
    # (README "Defaults"); 16 raised mamba_va's OOF CCC from 0.823 to 0.849 on the demo and from
    # 0.448 to 0.533 on abaw.demo.SHORT_SPEC's data.
    epochs: int = 16
    patience: int = 6  # early stopping on validation CCC
    stop_split: float = 0.0  # >0: early-stop on this share of the training subjects, not on the fold (honest OOF)
    warmup_epochs: int = 1
    lr: float = 1e-3
    weight_decay: float = 1e-3
    dropout: float | None = None  # None: the architecture's default
    batch_size: int = 16
    grad_clip: float = 1.0
    window: int = 300
    hop: int = 200
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    jobs: int = 1  # folds trained in parallel (one per GPU on CUDA)
    seed: int = 0
    out: str = "runs/demo"
    full_sequence_predict: bool = False  # predict whole videos in one pass instead of windows
    presence: bool = False  # one more input channel per modality, 1 where the frame has its feature (a face);
                            # off by default: it measured no gain on the demo (README "Frames without a face")

    def __post_init__(self):
        problems = []
        for name in ("epochs", "patience", "window", "hop", "batch_size", "jobs"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.stop_split < 1.0:
            problems.append(f"stop_split must be in [0, 1), got {self.stop_split}")
        if self.hop > self.window:
            problems.append(f"hop ({self.hop}) larger than window ({self.window}) would leave frames unseen")
        if self.folds < 2 or (self.fold_mode == "val_fold" and self.folds < 3):
            problems.append(f"folds must be at least 2 (3 with fold_mode val_fold), got {self.folds}")
        if self.fold_mode not in ("grouped", "val_fold", "holdout_val"):
            problems.append(f"fold_mode must be grouped, val_fold or holdout_val, got {self.fold_mode!r}")
        if self.size not in ("demo", "abaw"):
            problems.append(f"size must be demo or abaw, got {self.size!r}")
        if problems:
            raise ValueError("invalid run config: " + "; ".join(problems))

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    def to_yaml(self) -> str:
        return yaml.safe_dump(asdict(self), sort_keys=False)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file; an unknown key is an error naming the file and the key."""
    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ValueError(f"{path}{where}: not valid YAML: {exc}") from exc
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option: value, got {type(values).__name__}")
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - RunConfig.field_names())
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {unknown}; known: {sorted(RunConfig.field_names())}")
    return values


def resolve(args: argparse.Namespace) -> RunConfig:
    """Defaults, then the YAML file, then every flag the user actually gave."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        if not Path(args.config).is_file():
            raise ValueError(f"config file {args.config} not found")
        values.update(load_yaml(args.config))
    for name in RunConfig.field_names():
        given = getattr(args, name, None)
        if given is not None:
            values[name] = given
    if isinstance(values.get("arch"), str):
        values["arch"] = [values["arch"]]
    return RunConfig(**values)
