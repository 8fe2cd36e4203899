"""Train one model on one fold: masked CCC loss, AdamW with warm-up + cosine, early stopping.

A fold folder holds ``model.pt`` (best epoch), ``history.csv``, ``last.pt`` (resume checkpoint,
deleted once the fold completes) and ``metrics.json``, written last: its presence marks the fold
complete. Every file is written atomically, so a kill at any point loses at most the epoch in flight.
They hold tensors and plain values only and are read with ``torch.load(weights_only=True)``
(:mod:`abaw.checkpoint`): a last.pt that is truncated, corrupt or would need more (and so could run
code) is deleted with model.pt and history.csv and the fold starts over; such a model.pt is rewritten
from last.pt when it holds the best epoch. Either is said as a ``warning`` progress event.

A classical architecture (``abaw.models.is_classical``: ``fit``/``predict``, e.g. ``context_ridge``)
is fitted once on the fold's training videos instead (nothing early-stops, so a stop split goes back
into training); its fold folder holds ``model.npz`` + ``model.json`` (:func:`load_classical`), the
same prediction files and ``metrics.json`` (best_epoch -1, epochs_run 0). A killed fit is redone.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from .checkpoint import CheckpointError, describe, load_checkpoint, numpy_scalars
from .config import RunConfig
from .console import console
from .data import Dataset, VideoRecord
from .devices import resolve_device
from .io import atomic_torch_save, atomic_write_json, atomic_write_text
from .metrics import ccc_loss, score
from .models import create_model, is_classical, model_class, model_info
from .runs import write_predictions
from .schedules import warmup_cosine
from .windows import WindowDataset, predict_videos

DROPOUT_FIELDS = {"dropout", "tcn_dropout"}  # what --dropout / the tuned dropout sets, where present
EpochCallback = Callable[[int, float], None]  # (epoch, validation CCC); may raise to stop (e.g. pruning)
ProgressCallback = Callable[[dict], None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite: this fold stops, the others go on."""


@dataclass
class FoldResult:
    arch: str
    fold: int
    status: str  # "completed" | "failed"
    valence: float = float("nan")
    arousal: float = float("nan")
    mean: float = float("nan")
    best_epoch: int = -1
    epochs_run: int = 0
    seconds: float = 0.0
    error: str = ""
    # Best CCC on the videos that chose the epoch: the stop split's with stop_split > 0, else the
    # fold's own (= mean). With a stop split this, not `mean`, is what tuning may select on.
    stop_ccc: float = float("nan")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_modalities(arch: str, info, dataset: Dataset) -> None:
    missing = [m for m in info.modalities if m not in dataset.modalities]
    if missing:
        raise ValueError(f"{arch} needs modalities {list(info.modalities)} but {dataset.root}/features has "
                         f"no {missing}; available: {sorted(dataset.modalities)}")


def build_model(config: RunConfig, arch: str, dataset: Dataset) -> torch.nn.Module:
    """The architecture at the run's size, with the dataset's feature dims and the run's overrides."""
    overrides = dict(config.model.get(arch, {}))
    input_dims = {m: d + int(config.presence) for m, d in dataset.modalities.items()}  # + the presence channel
    info = model_info(arch, size=config.size, input_dims=input_dims, **overrides)
    if config.dropout is not None:  # the run-wide dropout sets every dropout field the config has
        for name in DROPOUT_FIELDS & {f.name for f in fields(info.config)}:
            overrides.setdefault(name, config.dropout)
    _check_modalities(arch, info, dataset)
    model = create_model(arch, size=config.size, input_dims=input_dims, **overrides)
    model.presence_channel = config.presence  # read by WindowDataset and predict_videos
    if getattr(model, "out_dim", 2) != 2:
        raise ValueError(f"{arch} predicts {model.out_dim} output(s) (single_target); cross-validation "
                         f"trains joint valence-arousal models")
    return model


def build_classical(config: RunConfig, arch: str, dataset: Dataset):
    """An unfitted classical estimator at the run's size, with the dataset's feature dims and the run's
    overrides. It reads the features itself: the run's presence channel and dropout do not apply."""
    overrides = dict(config.model.get(arch, {}))
    info = model_info(arch, size=config.size, input_dims=dataset.modalities, **overrides)
    _check_modalities(arch, info, dataset)
    return create_model(arch, size=config.size, input_dims=dataset.modalities, **overrides)


def load_classical(fold_dir: str | Path):
    """The fitted classical model a fold folder holds (``model.json`` names its architecture)."""
    import json

    arch = json.loads((Path(fold_dir) / "model.json").read_text())["arch"]
    return model_class(arch).load(fold_dir)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and Mamba's A_log / D (flagged _no_weight_decay, as mamba-ssm does)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or getattr(param, "_no_weight_decay", False) else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, config: RunConfig) -> torch.optim.AdamW:
    """AdamW over :func:`_param_groups`; the fused implementation on CPU and CUDA (one kernel for all
    parameters: 3x faster than the per-parameter loop for a small model, equal within rounding)."""
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, fused=fused)


def evaluate(model, videos: list[VideoRecord], config: RunConfig, device) -> tuple[dict[str, float], dict]:
    """Whole-video predictions of ``videos`` and their CCC over all labelled frames concatenated."""
    preds = predict_videos(model, videos, config.window, config.hop, device, config.full_sequence_predict)
    return score_videos(preds, videos), preds


def evaluate_classical(model, videos: list[VideoRecord]) -> tuple[dict[str, float], dict]:
    """:func:`evaluate` for a fitted classical model (``model.predict(video)`` -> (T, 2))."""
    preds = {v.name: model.predict(v) for v in videos}
    return score_videos(preds, videos), preds


def score_videos(preds: dict[str, np.ndarray], videos: list[VideoRecord]) -> dict[str, float]:
    """CCC over all labelled frames of ``videos`` concatenated ({} when none is labelled)."""
    labelled = [v for v in videos if v.labels is not None]
    if not labelled:
        return {}
    pred = np.concatenate([preds[v.name] for v in labelled])
    target = np.concatenate([v.labels for v in labelled])
    mask = np.concatenate([v.label_mask for v in labelled])
    return score(pred, target, mask)


def save_predictions(path: Path, preds: dict[str, np.ndarray], videos: list[VideoRecord], labelled_only: bool,
                     fold: int | None = None) -> None:
    """``video,frame,valence,arousal[,fold]`` rows (see :func:`abaw.runs.write_predictions`)."""
    for video in videos:
        if not np.isfinite(preds[video.name]).all():
            raise TrainingDiverged(f"the model predicts non-finite values for {video.name!r}")
    masks = {v.name: v.label_mask for v in videos} if labelled_only else None
    write_predictions(path, {v.name: preds[v.name] for v in videos}, fold=fold, masks=masks)


def split_by_subject(videos: list[VideoRecord], share: float, seed: int) -> tuple[list, list]:
    """Move about ``share`` of the labelled frames, whole subjects at a time, out of ``videos``."""
    subjects = sorted({v.subject for v in videos})
    order = np.random.default_rng(seed).permutation(len(subjects))
    frames = {s: 0 for s in subjects}
    for v in videos:
        frames[v.subject] += int(v.label_mask.sum())
    target, taken, held = share * sum(frames.values()), 0, set()
    for i in order:
        if taken >= target or len(held) == len(subjects) - 1:
            break
        held.add(subjects[i])
        taken += frames[subjects[i]]
    return [v for v in videos if v.subject not in held], [v for v in videos if v.subject in held]


class CheckpointMismatch(RuntimeError):
    """A fold folder's ``model.pt`` is not the best epoch its ``last.pt`` names, and cannot be repaired."""


def _rng_state(device: torch.device) -> dict:
    """The random streams training draws from (dropout): the CPU generator's, and on a GPU its device's.

    Only the fold's own GPU: the fold may resume on another GPU of the pool, which then continues
    this stream. numpy and Python's ``random`` are not stored: once seeded, training draws nothing
    from them (the loader shuffles with its own generator, seeded per epoch)."""
    state = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(saved: dict, device: torch.device) -> None:
    """Restore what applies on ``device``: a GPU stream only on a GPU (a CPU fold never draws from one),
    and none for a checkpoint made on a CPU (the GPU generator keeps its seed)."""
    torch.set_rng_state(saved["rng"].cpu())  # .cpu(): the load's map_location moves it to the GPU
    if device.type == "cuda" and "cuda_rng" in saved:
        torch.cuda.set_rng_state(saved["cuda_rng"].cpu(), device)


def _print_warnings(event: dict) -> None:
    if event["kind"] == "warning":
        console.print(f"{event['arch']} fold {event['fold']}: {event['message']}", markup=False)


class FoldTrainer:
    """Trains ``arch`` on every train+val video outside ``fold``, validating on the fold."""

    def __init__(self, config: RunConfig, arch: str, fold: int, dataset: Dataset, folds: pd.DataFrame,
                 out_dir: str | Path, device: torch.device | None = None,
                 epoch_callback: EpochCallback | None = None, progress: ProgressCallback | None = None):
        self.config, self.arch, self.fold, self.dataset = config, arch, fold, dataset
        self.out = Path(out_dir)
        self.device = device or resolve_device(config.device)
        self.epoch_callback = epoch_callback
        self.progress = progress or _print_warnings  # alone (tuning), the fold still says what it repaired
        fold_of = dict(zip(folds["video"], folds["fold"]))
        labelled = dataset.split("train", "val")
        self.train_videos = [v for v in labelled if fold_of[v.name] not in (fold, -1)]
        self.val_videos = [v for v in labelled if fold_of[v.name] == fold]
        # Videos that choose the best epoch: the fold itself (as published), or with stop_split a
        # share of the training subjects, so the fold's OOF predictions chose nothing.
        self.stop_videos = self.val_videos
        if config.stop_split > 0:
            self.train_videos, self.stop_videos = split_by_subject(self.train_videos, config.stop_split,
                                                                   self.seed)
        self.holdout_videos = [v for v in labelled if fold_of[v.name] == -1]
        self.test_videos = dataset.split("test")

    @property
    def seed(self) -> int:
        return self.config.seed * 1000 + self.fold

    @property
    def fit_videos(self) -> list[VideoRecord]:
        """Every training video of the fold: a classical fit early-stops on nothing, so the stop split
        (with stop_split > 0) goes back into training."""
        return self.train_videos + (self.stop_videos if self.config.stop_split > 0 else [])

    def _emit(self, **event) -> None:
        self.progress({"arch": self.arch, "fold": self.fold, **event})

    def _loader(self, windows: WindowDataset, epoch: int) -> DataLoader:
        # One generator per epoch, seeded by (seed, epoch): a resumed run shuffles like an unbroken one.
        generator = torch.Generator().manual_seed(self.seed * 10007 + epoch)
        return DataLoader(windows, batch_size=self.config.batch_size, shuffle=True, generator=generator,
                          drop_last=len(windows) > self.config.batch_size)

    def run(self) -> FoldResult:
        start = time.time()
        metrics_path = self.out / "metrics.json"
        (self.out / "failed.json").unlink(missing_ok=True)  # a rerun retries a failed fold
        try:
            result = self._train()
        except TrainingDiverged as exc:
            (self.out / "last.pt").unlink(missing_ok=True)  # resuming would only diverge again
            result = FoldResult(self.arch, self.fold, "failed", error=str(exc))
            atomic_write_json(self.out / "failed.json", asdict(result))
            self._emit(kind="failed", error=str(exc))
            return result
        result.seconds = round(time.time() - start, 2)
        atomic_write_json(metrics_path, asdict(result))  # last: marks the fold complete
        (self.out / "last.pt").unlink(missing_ok=True)
        self._emit(kind="done", result=asdict(result))
        return result

    def _save_checkpoint(self, model, optimizer, scheduler, state: dict) -> None:
        atomic_torch_save(self.out / "last.pt", {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            **_rng_state(self.device), "state": state})

    def _save_best(self, model, epoch: int) -> None:
        atomic_torch_save(self.out / "model.pt", {
            "arch": self.arch, "model_config": asdict(model.config), "run_config": asdict(self.config),
            "fold": self.fold, "epoch": epoch, "state_dict": model.state_dict()})

    def _write_history(self, state: dict) -> None:
        atomic_write_text(self.out / "history.csv", pd.DataFrame(state["history"]).to_csv(index=False))

    def _read_last(self) -> dict | None:
        """last.pt, or None when there is none or it cannot be loaded safely: then the fold starts over.

        A truncated or corrupt last.pt cannot be resumed from; one that needs more than tensors and
        plain values was not written by this toolkit and is never unpickled. Either way the fold's other
        files belong to the epochs it committed, so they go with it."""
        path = self.out / "last.pt"
        if not path.exists():
            return None
        try:  # numpy scalars: an earlier abaw's history held them; resuming its run stays possible
            return load_checkpoint(path, self.device, allow=numpy_scalars())
        except CheckpointError as exc:
            for name in ("last.pt", "model.pt", "history.csv"):
                (self.out / name).unlink(missing_ok=True)
            self._warn("restarted", f"{path} is {describe(exc)}: the fold starts again from epoch 0")
            return None

    def _warn(self, note: str, message: str) -> None:
        """A fold-level warning: ``note`` for its progress bar, ``message`` for the user."""
        self._emit(kind="warning", note=note, message=message)

    def _resume(self, saved: dict, model, optimizer, scheduler) -> dict:
        """Resume from last.pt, the fold's commit point, and bring model.pt and history.csv in line with it."""
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        _restore_rng(saved, self.device)
        state = saved["state"]
        self._repair_best(model, state)
        self._write_history(state)  # a kill may have come before the epoch's history.csv
        return state

    def _repair_best(self, model, state: dict) -> None:
        """Rewrite model.pt from last.pt's weights (``model`` holds them) if a kill fell between the two."""
        path = self.out / "model.pt"
        saved_epoch, problem = self._best_epoch_saved(path)
        if saved_epoch == state["best_epoch"]:
            return
        if state["best_epoch"] != state["epoch"]:  # the best weights are in neither file
            held = (f"epoch {saved_epoch}" if saved_epoch is not None else
                    f"nothing usable (it is {problem})" if problem else "nothing (missing)")
            raise CheckpointMismatch(
                f"{self.out}: last.pt resumes after epoch {state['epoch']} with epoch {state['best_epoch']} as "
                f"the best, but model.pt holds {held}; delete {self.out} to train this fold again")
        if problem:  # a kill between the two writes needs no word; a damaged file does
            self._warn("repaired", f"{path} is {problem}: rewritten from last.pt (epoch {state['epoch']})")
        self._save_best(model, state["epoch"])

    @staticmethod
    def _best_epoch_saved(path: Path) -> tuple[int | None, str]:
        """The epoch model.pt holds (None when missing or unusable) and what is wrong with it ("" if nothing)."""
        if not path.exists():
            return None, ""
        try:
            return load_checkpoint(path)["epoch"], ""
        except CheckpointError as exc:  # like a missing model.pt: last.pt may hold the weights to rewrite it
            return None, describe(exc)

    def _train(self) -> FoldResult:
        """Fit the fold's model and write its predictions: epochs for a neural arch, one fit for a classical one."""
        if is_classical(self.arch):
            return self._fit_classical()
        return self._train_neural()

    def _fit_classical(self) -> FoldResult:
        """One fit on every training video, saved, then the fold's, test and held-out videos predicted."""
        self._emit(kind="start", epochs=0, epoch=0, steps=0)
        model = build_classical(self.config, self.arch, self.dataset)
        model.fit(self.fit_videos)
        model.save(self.out, extra={"arch": self.arch, "fold": self.fold, "run_config": asdict(self.config)})
        val = self._write_predictions(lambda videos: evaluate_classical(model, videos))
        return FoldResult(self.arch, self.fold, "completed", val["valence"], val["arousal"], val["mean"],
                          best_epoch=-1, epochs_run=0, stop_ccc=val["mean"])

    def _train_neural(self) -> FoldResult:
        cfg = self.config
        seed_everything(self.seed)
        model = build_model(cfg, self.arch, self.dataset).to(self.device)
        windows = WindowDataset(self.train_videos, model.modalities, cfg.window, cfg.hop, cfg.presence)
        windows.index = [(i, s) for i, s in windows.index  # windows without a single label teach nothing
                         if windows.videos[i].label_mask[s:s + cfg.window].any()]
        steps_per_epoch = len(self._loader(windows, 0))
        optimizer = make_optimizer(model, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, warmup_cosine(cfg.warmup_epochs * steps_per_epoch, cfg.epochs * steps_per_epoch))
        state = {"epoch": 0, "best": -math.inf, "best_epoch": -1, "bad_epochs": 0, "history": []}

        saved = self._read_last()
        if saved is not None:  # resume an interrupted fold from its last finished epoch
            state = self._resume(saved, model, optimizer, scheduler)
            self._emit(kind="resumed", epoch=state["epoch"])
        else:  # a fresh start (or a retry after a failure): an earlier attempt's best model is not ours
            (self.out / "model.pt").unlink(missing_ok=True)

        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        self._emit(kind="start", epochs=cfg.epochs, epoch=state["epoch"], steps=steps_per_epoch)
        while state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience:
            epoch = state["epoch"]
            tic = time.time()
            model.train()
            losses = []
            for step, batch in enumerate(self._loader(windows, epoch)):
                feats = {m: batch[m].to(self.device, non_blocking=True) for m in model.modalities}
                mask = batch["mask"].to(self.device)
                with autocast:
                    out = model(feats, mask)
                loss = ccc_loss(out.float(), batch["labels"].to(self.device), mask & batch["label_mask"].to(self.device))
                if not torch.isfinite(loss):
                    raise TrainingDiverged(f"{self.arch} fold {self.fold}: loss is {loss.item()} at epoch "
                                           f"{epoch + 1}, step {step + 1} (rerun into another --out with a lower "
                                           f"--lr, or check the features for inf values)")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                losses.append(loss.item())
                self._emit(kind="step", epoch=epoch, step=step + 1, steps=steps_per_epoch)

            val, _ = evaluate(model, self.stop_videos, cfg, self.device)
            if not math.isfinite(val["mean"]):
                raise TrainingDiverged(f"{self.arch} fold {self.fold}: validation CCC is {val['mean']} after "
                                       f"epoch {epoch + 1} (non-finite predictions)")
            state["epoch"] = epoch + 1
            # plain floats: last.pt loads with weights_only=True, which refuses numpy scalars
            state["history"].append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                                     "val_ccc_v": float(val["valence"]), "val_ccc_a": float(val["arousal"]),
                                     "val_ccc": float(val["mean"]), "lr": float(scheduler.get_last_lr()[0]),
                                     "seconds": round(time.time() - tic, 2)})
            improved = val["mean"] > state["best"]
            if improved:
                state.update(best=float(val["mean"]), best_epoch=epoch + 1, bad_epochs=0)
            else:
                state["bad_epochs"] += 1
            # last.pt first: it commits the epoch. It holds this epoch's weights, so a kill before
            # model.pt is written is repaired on resume (_repair_best); model.pt never runs ahead of it.
            self._save_checkpoint(model, optimizer, scheduler, state)
            if improved:
                self._save_best(model, epoch + 1)
            self._write_history(state)
            self._emit(kind="epoch", epoch=epoch + 1, val=val["mean"], best=state["best"])
            if self.epoch_callback is not None:
                self.epoch_callback(epoch, val["mean"])

        return self._predict_with_best(model, state)

    def _predict_with_best(self, model, state) -> FoldResult:
        cfg = self.config
        best = load_checkpoint(self.out / "model.pt", self.device)
        model.load_state_dict(best["state_dict"])
        val = self._write_predictions(lambda videos: evaluate(model, videos, cfg, self.device))
        stop_ccc = state["best"] if cfg.stop_split > 0 else val["mean"]
        return FoldResult(self.arch, self.fold, "completed", val["valence"], val["arousal"], val["mean"],
                          state["best_epoch"], state["epoch"], stop_ccc=stop_ccc)

    def _write_predictions(self, predict: Callable[[list[VideoRecord]], tuple[dict, dict]]) -> dict[str, float]:
        """oof.csv (the fold's labelled frames), test/fold<k>.csv and holdout/fold<k>.csv (every frame)
        from ``predict(videos) -> (scores, preds)``; returns the fold's scores."""
        val, val_preds = predict(self.val_videos)
        save_predictions(self.out / "oof.csv", val_preds, self.val_videos, labelled_only=True, fold=self.fold)
        arch_dir = self.out.parent
        for folder, videos in (("test", self.test_videos), ("holdout", self.holdout_videos)):
            if videos:
                _, preds = predict(videos)
                save_predictions(arch_dir / folder / f"fold{self.fold}.csv", preds, videos, labelled_only=False)
        return val


def train_fold_in_worker(config: RunConfig, arch: str, fold: int, dataset: Dataset, folds: pd.DataFrame,
                         fold_dir: str | Path, device: str, threads: int, progress: ProgressCallback) -> dict:
    """One fold in a worker process (joblib or Ray), as a plain dict: torch and BLAS capped at
    ``threads``, so that folds running side by side do not oversubscribe the cores, and so that a
    fold's float rounding depends on its thread count alone, wherever it runs."""
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    trainer = FoldTrainer(config, arch, fold, dataset, folds, fold_dir, device=torch.device(device), progress=progress)
    with threadpool_limits(threads):  # numpy's BLAS too (a classical fit is numpy matrix products)
        return asdict(trainer.run())
