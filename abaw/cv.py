"""The cross-validation engine: one model per (architecture, fold), resumable, in parallel.

Run folder (read by make_submission.py, the report and the notebooks)::

    runs/<name>/config.yaml              fully resolved config
    runs/<name>/folds.csv                video,subject,split,fold (fold -1: held out of the CV)
    runs/<name>/<arch>/fold<k>/          model.pt, metrics.json, history.csv, oof.csv
                                         (a classical arch: model.npz + model.json, metrics.json, oof.csv)
    runs/<name>/<arch>/oof.csv           video,frame,valence,arousal,fold: every labelled train+val frame
    runs/<name>/<arch>/test/fold<k>.csv  video,frame,valence,arousal: every frame of every test video
    runs/<name>/<arch>/holdout/fold<k>.csv  (fold_mode holdout_val) every frame of the held-out videos
    runs/<name>/summary.csv              per arch and fold: CCC v, a, mean; and the OOF CCC

Run the same command again after a kill and it continues: complete folds (``metrics.json``) are
skipped and an interrupted fold resumes from its last epoch (``last.pt``).
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .config import RunConfig
from .console import console, table
from .data import Dataset
from .folds import HOLDOUT, fold_table_changes, load_or_make_folds, read_fold_table
from .io import atomic_path, atomic_write_text
from .metrics import score
from .models import list_models
from .runs import read_prediction_table
from .devices import resolve_device
from .train import FoldTrainer, train_fold_in_worker

# Options that may change between a run and its resumption without changing any result.
RESUMABLE_KEYS = {"arch", "jobs", "device"}


class RunConflict(RuntimeError):
    pass


class RunFolderError(RuntimeError):
    """The run folder cannot be written (permissions, a read-only or full disk), found before any training."""


def check_writable(out: Path) -> None:
    """Create ``out`` and write (then remove) a probe file in it: a folder we may not write fails now, in
    a second, instead of after a fold's training, when its first checkpoint is saved."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        reason = (exc.strerror or str(exc)).lower()
        raise RunFolderError(f"the run folder {out} is not writable ({reason}): nothing was trained; "
                             f"make it writable, free space, or choose another --out") from exc


def prepare_run_dir(config: RunConfig) -> RunConfig:
    """Create the run folder, or resume one made with the same settings; never clobber another run.

    Returns the run's config: ``config`` with the architectures already in the run added."""
    out = Path(config.out)
    check_writable(out)
    path = out / "config.yaml"
    new = asdict(config)
    if path.exists():
        # An option a run's config.yaml lacks was added later; the run had its default.
        old = {**asdict(RunConfig()), **(yaml.safe_load(path.read_text()) or {})}
        changed = {k: (old.get(k), v) for k, v in new.items() if k not in RESUMABLE_KEYS and old.get(k) != v}
        if changed:
            diff = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(changed.items()))
            raise RunConflict(f"{out} holds a run made with other settings ({diff}). Use another --out, "
                              f"or delete {out} to start over.")
        new["arch"] = list(dict.fromkeys(list(old.get("arch", [])) + list(config.arch)))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(new, sort_keys=False))
    return RunConfig(**new)


def check_run_folds(path: Path, folds: pd.DataFrame) -> None:
    """A resumed run must use the very fold table it was started with (``path``, if it exists).

    Finished folds were trained and OOF-scored under the saved table: continuing under another one
    (another subject rule or subject file, another data root) would mix two fold assignments."""
    if not path.exists():
        return
    changes = fold_table_changes(read_fold_table(path), folds)
    if changes:
        raise RunConflict(f"{path} differs from the fold table this run would use now ({'; '.join(changes)}). "
                          f"Its finished folds were trained under the saved table: rerun with the data root and "
                          f"--subjects it was made with, or use another --out.")


def fold_ids(folds: pd.DataFrame) -> list[int]:
    return sorted(int(f) for f in folds["fold"].unique() if f != HOLDOUT)


def is_complete(fold_dir: Path) -> bool:
    return (fold_dir / "metrics.json").exists()


def _fold_job(config: RunConfig, arch: str, fold: int, dataset: Dataset, folds: pd.DataFrame, out: Path,
              device_pool, threads: int, events) -> dict:
    """One (arch, fold) in a joblib worker. The device is borrowed from a shared pool for the fold's
    duration, so two folds never share a GPU however joblib schedules them."""
    device = device_pool.get()
    try:
        return train_fold_in_worker(config, arch, fold, dataset, folds, out / arch / f"fold{fold}", device, threads,
                                    events.put)
    finally:
        device_pool.put(device)


class CVProgress:
    """Rich bars per fold (epochs, with ETA) and a live table of fold scores."""

    def __init__(self, tasks: list[tuple[str, int]], epochs: int):
        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                             console=console)
        self.ids = {task: self.bars.add_task(f"{task[0]} fold {task[1]}", total=epochs, note="queued")
                    for task in tasks}
        self.scores: dict[tuple[str, int], dict] = {}
        self.nodes: dict[tuple[str, int], str] = {}  # on a cluster: the node each fold runs on
        self.live = Live(self._render(), console=console, refresh_per_second=4, transient=False,
                         auto_refresh=console.is_terminal)

    def _render(self):
        shown = sorted(set(self.scores) | set(self.nodes))
        rows = [{"arch": a, "fold": f, **({"node": self.nodes.get((a, f), "")} if self.nodes else {}),
                 "CCC v": s.get("valence", float("nan")), "CCC a": s.get("arousal", float("nan")),
                 "CCC": s.get("mean", float("nan")), "status": s.get("status", "running")}
                for (a, f) in shown for s in [self.scores.get((a, f), {})]]
        return Group(self.bars, table(rows, title="Fold scores")) if rows else self.bars

    def __call__(self, event: dict) -> None:
        key = (event["arch"], event["fold"])
        bar = self.ids[key]
        kind = event["kind"]
        if kind == "placed":  # a cluster task started (or was retried) on a node
            self.nodes[key] = event["node"]
            self.bars.update(bar, description=f"{key[0]} fold {key[1]} @ {event['node']}", note="starting")
        elif kind == "start" and event.get("epochs") == 0:  # a classical fold: one fit, then done (a 1-step bar)
            self.bars.update(bar, total=1, completed=0, note="fitting")
        elif kind in ("start", "resumed"):
            self.bars.update(bar, completed=event.get("epoch", 0), note="training")
        elif kind == "step":
            self.bars.update(bar, completed=event["epoch"] + event["step"] / event["steps"])
        elif kind == "epoch":
            self.bars.update(bar, completed=event["epoch"], note=f"val CCC {event['val']:.3f} (best {event['best']:.3f})")
        elif kind == "done":
            self.bars.update(bar, completed=self.bars.tasks[bar].total, note="done")
            self.scores[key] = event["result"]
        elif kind == "failed":
            self.bars.update(bar, note="[red]failed[/]")
            self.scores[key] = {"status": "failed"}
        elif kind == "warning":  # e.g. a damaged last.pt: the fold restarted; said on a terminal too
            self.bars.update(bar, note=f"[yellow]{event['note']}[/]")
            console.print(f"{key[0]} fold {key[1]}: {event['message']}", markup=False)
        if console.is_terminal:
            self.live.update(self._render())
        elif kind in ("placed", "epoch", "done", "failed", "resumed"):  # logs and CI: one plain line per event
            detail = {"placed": lambda: f"running on node {event['node']} (pid {event['pid']})",
                      "epoch": lambda: f"epoch {event['epoch']}/{self.bars.tasks[bar].total:.0f} "
                                       f"val CCC {event['val']:.4f} (best {event['best']:.4f})",
                      "done": lambda: f"done: CCC {event['result']['mean']:.4f}",
                      "failed": lambda: f"FAILED: {event['error']}",
                      "resumed": lambda: f"resumed after epoch {event['epoch']}"}[kind]()
            console.print(f"{key[0]} fold {key[1]}: {detail}", markup=False)


def _devices(config: RunConfig) -> list[str]:
    device = resolve_device(config.device)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]  # one GPU per fold
    return [str(device)]


def train_folds(config: RunConfig, dataset: Dataset, folds: pd.DataFrame, out: Path,
                tasks: list[tuple[str, int]]) -> list[dict]:
    """Train the pending (arch, fold) tasks: in-process for one job, else joblib workers."""
    devices = _devices(config)
    jobs = max(1, min(config.jobs, len(tasks))) if devices[0] == "cpu" else min(len(devices), len(tasks))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    view = CVProgress(tasks, config.epochs)
    with view.live:
        if jobs == 1:
            return [asdict(FoldTrainer(config, a, f, dataset, folds, out / a / f"fold{f}",
                                       device=torch.device(devices[0]), progress=view).run())
                    for a, f in tasks]
        from multiprocessing import Manager

        from joblib import Parallel, delayed

        with Manager() as manager:
            events, device_pool = manager.Queue(), manager.Queue()
            for device in (devices if devices[0] != "cpu" else devices * jobs):
                device_pool.put(device)
            pump = threading.Thread(target=_pump, args=(events, view), daemon=True)
            pump.start()
            results = Parallel(n_jobs=jobs, backend="loky")(
                delayed(_fold_job)(config, a, f, dataset, folds, out, device_pool, threads, events)
                for a, f in tasks)
            events.put(None)
            pump.join()
        return results


def _pump(events, view: CVProgress) -> None:
    while (event := events.get()) is not None:
        view(event)


def assemble_oof(arch_dir: Path, folds: list[int]) -> pd.DataFrame | None:
    """Concatenate the folds' out-of-fold predictions; None unless every fold completed."""
    parts = [arch_dir / f"fold{k}" / "oof.csv" for k in folds]
    if not all(is_complete(p.parent) for p in parts):
        return None
    oof = pd.concat([read_prediction_table(p, with_fold=True) for p in parts]).sort_values(["video", "frame"])
    with atomic_path(arch_dir / "oof.csv") as tmp:
        oof.to_csv(tmp, index=False, float_format="%.6f")
    return oof


def oof_score(oof: pd.DataFrame, dataset: Dataset) -> dict[str, float]:
    labels = {name: v.labels for name, v in dataset.videos.items() if v.labels is not None}
    target = np.concatenate([labels[name][group["frame"].to_numpy() - 1] for name, group in oof.groupby("video")])
    pred = np.concatenate([group[["valence", "arousal"]].to_numpy() for _, group in oof.groupby("video")])
    return score(pred, target)


def summarise(config: RunConfig, dataset: Dataset, out: Path, folds: list[int]) -> pd.DataFrame:
    """summary.csv: one row per (arch, fold) and one OOF row per arch."""
    rows = []
    for arch in config.arch:
        for k in folds:
            fold_dir = out / arch / f"fold{k}"
            if is_complete(fold_dir):
                m = json.loads((fold_dir / "metrics.json").read_text())
                rows.append({"arch": arch, "fold": str(k), "ccc_v": m["valence"], "ccc_a": m["arousal"],
                             "ccc": m["mean"], "status": "completed"})
            else:
                status = "failed" if (fold_dir / "failed.json").exists() else "missing"
                rows.append({"arch": arch, "fold": str(k), "ccc_v": np.nan, "ccc_a": np.nan, "ccc": np.nan,
                             "status": status})
        oof = assemble_oof(out / arch, folds)
        if oof is not None:
            s = oof_score(oof, dataset)
            rows.append({"arch": arch, "fold": "oof", "ccc_v": s["valence"], "ccc_a": s["arousal"],
                         "ccc": s["mean"], "status": "completed"})
    summary = pd.DataFrame(rows)
    with atomic_path(out / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False, float_format="%.6f")
    return summary


def check_archs(archs: list[str]) -> None:
    unknown = [a for a in archs if a not in list_models()]
    if unknown:
        raise ValueError(f"unknown architecture(s) {unknown}; known: {', '.join(list_models())}")


def run_cv(config: RunConfig, dataset: Dataset, folds_dir: str | Path = "folds", cluster=None) -> int:
    """Train every pending (arch, fold) of the run; returns 0 when every fold completed.

    ``cluster`` (an :class:`abaw.cluster.ClusterConfig`): train them as Ray tasks on that cluster,
    connected to before anything is written."""
    if cluster is None:
        return _run_cv(config, dataset, folds_dir, train_folds)
    from .cluster import absolute_dataset, check_shared_storage, cluster_session, dataset_files, train_folds_on_cluster

    def train_on_cluster(config, dataset, folds, out, tasks) -> list[dict]:
        view = CVProgress(tasks, config.epochs)
        with view.live:
            return train_folds_on_cluster(ray, cluster, config, dataset, folds, out, tasks, view)

    with cluster_session(cluster.address) as ray:
        check_shared_storage(ray, [Path(config.out).resolve()], dataset_files(absolute_dataset(dataset)))
        return _run_cv(config, dataset, folds_dir, train_on_cluster)


def _run_cv(config: RunConfig, dataset: Dataset, folds_dir: str | Path, train) -> int:
    check_archs(config.arch)
    out = Path(config.out)
    folds, folds_file = load_or_make_folds(dataset, config.folds, config.fold_mode, config.seed, folds_dir)
    check_run_folds(out / "folds.csv", folds)  # before anything in the run folder is written
    run_config = prepare_run_dir(config)
    if not (out / "folds.csv").exists():
        atomic_write_text(out / "folds.csv", folds.to_csv(index=False))
    ids = fold_ids(folds)
    tasks = [(a, k) for a in config.arch for k in ids if not is_complete(out / a / f"fold{k}")]
    done = len(config.arch) * len(ids) - len(tasks)
    console.print(f"run {out}: {len(config.arch)} arch x {len(ids)} folds ({folds_file}); "
                  f"{done} already complete, {len(tasks)} to train")
    if tasks:
        try:
            train(config, dataset, folds, out, tasks)
        finally:
            console.print()  # the live bars end mid-line: a summary or an error line goes below them
    summary = summarise(run_config, dataset, out, ids)
    console.print(table(summary.to_dict("records"), title=f"Summary ({out / 'summary.csv'})"))
    failed = summary[summary["status"] != "completed"]
    for row in failed.itertuples():
        reason = ""
        failed_file = out / row.arch / f"fold{row.fold}" / "failed.json"
        if failed_file.exists():
            reason = json.loads(failed_file.read_text())["error"]
        console.print(f"[red]{row.arch} fold {row.fold}: {row.status}[/] {reason}", markup=True)
    return 0 if failed.empty else 1
