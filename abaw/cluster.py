"""Folds and tuning workers as Ray tasks (``run_cv.py --cluster ADDRESS``): one machine's CV, on many.

Ray (https://docs.ray.io) is the engine: it places each (architecture, fold) on a node with the
resources the fold asks for, retries a task whose worker or node died, and carries the folds' progress
back to this driver. Nothing here is home-made scheduling. Ray is an optional extra (``.[cluster]``),
imported inside these functions only, which only ``--cluster`` calls.

What a cluster run needs from its nodes (checked by :func:`check_shared_storage` before any fold
starts): every node sees the run folder (folds write their files into it, and a fold retried on
another node resumes from the ``last.pt`` its first attempt wrote there) and the dataset root (a
fold reads its features, memory-mapped, from there); every node has this same ``abaw`` installed.

Results: a fold trained on a cluster writes the very files it writes on one machine, given the same
torch threads per fold (``--cpus-per-fold``; on one machine, ``OMP_NUM_THREADS``). A fold's float
rounding, and so its last digits, depends on its thread count, not on where it ran.
"""
from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pandas as pd

from .config import RunConfig
from .data import Dataset
from .io import atomic_write_json

# Ray retries a task whose worker process or node died (not one that raised): the retry resumes
# the fold from its last.pt. Three is Ray's own default for tasks, stated here so it is not implicit.
MAX_RETRIES = 3
STEP_EVENT_SECONDS = 0.5  # a fold sends at most two batch-progress events a second to the driver
POLL_SECONDS = 0.25
CHECK_FILE = ".abaw-cluster-check"


class ClusterError(RuntimeError):
    """The cluster cannot run this job: no Ray, no cluster at the address, or storage not shared."""


@dataclass(frozen=True)
class ClusterConfig:
    address: str                # auto | local | ray://host:port | host:port (a running cluster's GCS)
    gpus_per_fold: float = 1.0  # GPU share each fold (or tuning worker) asks for on a cluster with GPUs; < 1 packs
    cpus_per_fold: int = 1      # CPUs each fold asks for; its torch (and BLAS) threads
    workers: int | None = None  # Optuna workers with --tune (default: as many as fit on the cluster at once)

    def __post_init__(self):
        if not 0 < self.gpus_per_fold <= 1:  # a fold trains on one device: more GPUs would sit reserved and idle
            raise ValueError(f"--gpus-per-fold {self.gpus_per_fold}: a fold trains on one GPU; give 1, or a fraction "
                             f"in (0, 1) to pack several folds on a GPU")
        if self.cpus_per_fold < 1:
            raise ValueError(f"--cpus-per-fold {self.cpus_per_fold}: a fold needs at least one CPU")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers {self.workers}: at least one worker")


def _ray():
    try:
        import ray
    except ImportError as exc:
        raise ClusterError("--cluster needs Ray: pip install 'abaw[cluster]' (on every node of the cluster)") from exc
    return ray


def check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast when nothing listens at a HOST:PORT or ray://HOST:PORT address: Ray itself keeps
    retrying an unreachable head for minutes before it gives up."""
    if address in ("auto", "local"):
        return  # Ray finds (or starts) these itself, and fails fast when it cannot
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"--cluster {address}: expected auto, local, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ClusterError(f"--cluster {address}: nothing answers at {host}:{port} ({exc}). Is the head node "
                           f"running (`ray start --head` prints its address; Ray Client listens on 10001)?") from exc


@contextmanager
def cluster_session(address: str) -> Iterator[object]:
    """Connect to the cluster at ``address`` (``local`` starts one on this machine) for the block's duration."""
    import logging

    ray = _ray()
    check_reachable(address)
    kwargs = {"logging_level": logging.WARNING, "log_to_driver": True}
    try:
        if address == "local":
            ray.init(address="local", include_dashboard=False, **kwargs)  # a new cluster, never a running one
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"--cluster {address}: cannot connect to a Ray cluster ({exc}). Start one with "
                           f"`ray start --head` (see README, 'Running on a cluster'), or use --cluster local") from exc
    try:
        yield ray
    finally:
        ray.shutdown()


def node_names(ray) -> dict[str, str]:
    """Alive nodes: node id -> the name the fold table shows (``ray start --node-name``, else the node's IP)."""
    return {n["NodeID"]: n.get("NodeName") or n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}


# -- shared storage -------------------------------------------------------------------------------

def _what_a_node_sees(writable: list[tuple[str, str]], readable: list[tuple[str, int]]) -> tuple[str, list[str]]:
    """On one node: which of the driver's tokens and files it cannot see (runs as a Ray task)."""
    missing = []
    for path, token in writable:
        try:
            seen = Path(path).read_text()
        except OSError:
            seen = None
        if seen != token:
            missing.append(f"{Path(path).parent} (the driver's check file is {'other' if seen else 'not there'})")
    for path, size in readable:
        try:
            ok = Path(path).stat().st_size == size
        except OSError:
            ok = False
        if not ok:
            missing.append(f"{path} (not there, or not the driver's file)")
    return socket.gethostname(), missing


def _ask_node(ray, ref, name: str) -> list[str]:
    """One node's answer to the storage check, as problem lines naming the node."""
    try:
        host, missing = ray.get(ref, timeout=120)
    except ray.exceptions.GetTimeoutError:
        return [f"node {name} did not answer within 2 minutes"]
    except ray.exceptions.RayError as exc:  # e.g. abaw not installed there (ModuleNotFoundError)
        return [f"node {name} failed the check: {last_line(exc)}"]
    return [f"node {name} ({host}) cannot see {m}" for m in missing]


def check_shared_storage(ray, folders: list[Path], files: list[Path]) -> None:
    """Refuse to start unless every alive node sees ``folders`` (where this run writes) and ``files``.

    The driver writes a random token into each folder, under a name of its own (a network
    filesystem may cache an earlier check file's absence); one task pinned to each node reads the
    tokens back and stats the files. A node that sees another token, or none, is on other storage."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    tokens, made = [], [f for f in folders if not f.exists()]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        path = folder / f"{CHECK_FILE}-{token[:8]}"
        path.write_text(token)
        tokens.append((str(path), token))
    readable = [(str(f), f.stat().st_size) for f in files]
    see = ray.remote(num_cpus=0, max_retries=0)(_what_a_node_sees)
    try:
        names = node_names(ray)
        refs = {node: see.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                .remote(tokens, readable) for node in names}
        problems = [line for node, ref in refs.items() for line in _ask_node(ray, ref, names[node])]
    finally:
        for path, _ in tokens:
            Path(path).unlink(missing_ok=True)
    if problems:
        for folder in made:  # refused: leave no empty run folder behind
            folder.rmdir()
        raise ClusterError("every node must see the run folder and the dataset on shared storage (NFS, Lustre, "
                           "GPFS...) at the same path, and have abaw installed:\n  " + "\n  ".join(problems))


def last_line(exc: BaseException) -> str:
    """The last line of an exception's message (Ray's carry the remote traceback before it)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[-1][:300] if lines else ''}"


def absolute_dataset(dataset: Dataset) -> Dataset:
    """The dataset with absolute feature paths: a Ray worker's working directory is not the driver's."""
    videos = {name: replace(v, feature_paths={m: Path(p).resolve() for m, p in v.feature_paths.items()})
              for name, v in dataset.videos.items()}
    return replace(dataset, root=Path(dataset.root).resolve(), videos=videos)


def dataset_files(dataset: Dataset) -> list[Path]:
    """One feature file per modality: enough to tell whether a node sees the driver's dataset root."""
    firsts: dict[str, Path] = {}
    for video in dataset.videos.values():
        for modality, path in video.feature_paths.items():
            firsts.setdefault(modality, Path(path))
    return list(firsts.values())


# -- resources ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    """What each task asks Ray for, and the torch device it trains on there."""

    num_cpus: int
    num_gpus: float
    device: str  # "cuda" (Ray sets CUDA_VISIBLE_DEVICES to the task's GPUs) | "cpu"

    def options(self) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


def placement(ray, cluster: ClusterConfig, device: str) -> Placement:
    """GPUs per fold where the cluster has GPUs (and --device allows them), else CPUs only.

    Refuses a request no node can meet: Ray would otherwise leave the tasks pending forever."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    has_gpus = any(r.get("GPU", 0) > 0 for r in nodes)
    if device.startswith("cuda") and not has_gpus:
        raise ClusterError(f"--device {device}: no node of the cluster has a GPU")
    use_gpus = has_gpus and device in ("auto", "cuda")
    if device.startswith("cuda:"):
        raise ClusterError(f"--device {device}: on a cluster Ray chooses each fold's GPU; use --device cuda or auto")
    ask = Placement(cluster.cpus_per_fold, cluster.gpus_per_fold if use_gpus else 0.0, "cuda" if use_gpus else "cpu")
    if not any(r.get("CPU", 0) >= ask.num_cpus and r.get("GPU", 0) >= ask.num_gpus for r in nodes):
        biggest = max(((r.get("CPU", 0), r.get("GPU", 0)) for r in nodes), default=(0, 0))
        raise ClusterError(f"each fold asks for {ask.num_cpus} CPU(s) and {ask.num_gpus:g} GPU(s), but no node has "
                           f"that much (the largest has {biggest[0]:g} CPUs, {biggest[1]:g} GPUs); lower "
                           f"--cpus-per-fold / --gpus-per-fold")
    return ask


def slots(ray, ask: Placement) -> int:
    """How many tasks asking ``ask`` the cluster runs at once."""
    total = 0
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        r = node["Resources"]
        fits = [int(r.get("CPU", 0) // ask.num_cpus)]
        if ask.num_gpus:
            fits.append(int(r.get("GPU", 0) / ask.num_gpus + 1e-9))
        total += min(fits)
    return max(1, total)


# -- events: folds -> driver ----------------------------------------------------------------------

class EventLog:
    """A Ray actor the folds send their progress events to; the driver drains it."""

    def __init__(self):
        self.events: list[dict] = []

    def put(self, event: dict) -> None:
        self.events.append(event)

    def drain(self) -> list[dict]:
        events, self.events = self.events, []
        return events


def _sender(log, throttle: float = STEP_EVENT_SECONDS) -> Callable[[dict], None]:
    """Fire-and-forget events to the driver; batch-step events at most every ``throttle`` seconds.

    A fold's end ("done", "failed") is not sent: the driver takes it from the task's result, which
    cannot arrive out of order or get lost with the log."""
    last = [0.0]

    def send(event: dict) -> None:
        if event.get("kind") in ("done", "failed"):
            return
        if event.get("kind") == "step":
            now = time.monotonic()
            if now - last[0] < throttle:
                return
            last[0] = now
        log.put.remote(event)

    return send


class FoldEvents:
    """The driver's side of the event log: drains it into the view, with node names for node ids."""

    def __init__(self, ray, view: Callable[[dict], None]):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.ray, self.view, self.names = ray, view, node_names(ray)
        self.nodes: dict[tuple[str, int], str] = {}  # where each fold runs (its latest attempt)
        self.finished: set[tuple[str, int]] = set()  # folds whose end the view has had: later events are stale
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self.log = ray.remote(num_cpus=0, scheduling_strategy=here)(EventLog).remote()  # on the driver's node
        self.lost = False

    def pump(self) -> None:
        if self.lost:
            return
        try:
            events = self.ray.get(self.log.drain.remote())
        except self.ray.exceptions.RayActorError:  # its node died: the folds go on, unseen until they end
            self.lost = True
            return
        for event in events:
            if (event["arch"], event["fold"]) in self.finished:
                continue
            if event["kind"] == "placed":
                if event["node"] not in self.names:
                    self.names.update(node_names(self.ray))  # a node that joined after the start
                event["node"] = self.names.get(event["node"], event["host"])
                self.nodes[(event["arch"], event["fold"])] = event["node"]
            self.view(event)


# -- the fold task --------------------------------------------------------------------------------

def _fold_task(config: RunConfig, arch: str, fold: int, dataset: Dataset, folds: pd.DataFrame, fold_dir: str,
               device: str, threads: int, log) -> dict:
    """One (arch, fold) on whichever node Ray chose: resumes from the fold's last.pt if a first attempt died."""
    import ray

    from .train import train_fold_in_worker

    send = _sender(log)
    send({"arch": arch, "fold": fold, "kind": "placed", "node": ray.get_runtime_context().get_node_id(),
          "host": socket.gethostname(), "pid": os.getpid()})
    return train_fold_in_worker(config, arch, fold, dataset, folds, fold_dir, device, threads, send)


def remote_task(ray, fn, ask: Placement):
    """``fn`` as a Ray task that is retried when its worker or node dies. A GPU task gets a fresh worker
    process each time (``max_calls=1``): a reused one keeps the CUDA context of the GPU it first had."""
    return ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False, max_calls=1 if ask.num_gpus else 0)(fn)


def _record_failure(fold_dir: Path, arch: str, fold: int, error: str) -> dict:
    """A fold whose task failed for good (its retries spent, an error outside training, files missing)."""
    from .train import FoldResult

    result = asdict(FoldResult(arch, fold, "failed", error=error))
    atomic_write_json(fold_dir / "failed.json", result)
    return result


def _fold_outcome(ray, ref, fold_dir: Path, arch: str, fold: int, node: str) -> dict:
    """A finished task's result; a failure (recorded in failed.json) when it raised or its files are not here."""
    try:
        result = ray.get(ref)
    except ray.exceptions.RayError as exc:
        return _record_failure(fold_dir, arch, fold, f"{last_line(exc)} (on the cluster)")
    if result["status"] == "completed" and not (fold_dir / "metrics.json").exists():
        return _record_failure(fold_dir, arch, fold, f"the fold finished on node {node}, but its files are not in "
                                                     f"{fold_dir}: that node does not share the run folder's storage")
    return result


def train_folds_on_cluster(ray, cluster: ClusterConfig, config: RunConfig, dataset: Dataset, folds: pd.DataFrame,
                           out: Path, tasks: list[tuple[str, int]], view: Callable[[dict], None]) -> list[dict]:
    """Every pending (arch, fold) as one Ray task; ``view`` gets their progress events, with node names.

    Call :func:`check_shared_storage` first (``run_cv`` does, before it writes anything)."""
    out = out.resolve()
    dataset = absolute_dataset(dataset)
    ask = placement(ray, cluster, config.device)
    events = FoldEvents(ray, view)
    task = remote_task(ray, _fold_task, ask)
    shared_dataset, shared_folds = ray.put(dataset), ray.put(folds)
    refs = {task.options(**ask.options(), name=f"{arch} fold {fold}").remote(
                config, arch, fold, shared_dataset, shared_folds, str(out / arch / f"fold{fold}"), ask.device,
                ask.num_cpus, events.log): (arch, fold)
            for arch, fold in tasks}
    results, pending = [], list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=POLL_SECONDS)
        events.pump()
        for ref in done:
            arch, fold = refs[ref]
            result = _fold_outcome(ray, ref, out / arch / f"fold{fold}", arch, fold,
                                   events.nodes.get((arch, fold), "?"))
            results.append(result)
            events.finished.add((arch, fold))
            view({"arch": arch, "fold": fold, **({"kind": "done", "result": result} if result["status"] == "completed"
                                                 else {"kind": "failed", "error": result["error"]})})
    return results


# -- Optuna workers -------------------------------------------------------------------------------

def cluster_storage(storage: str | None) -> str:
    """A storage every worker reaches: PostgreSQL (any SQLAlchemy server URL) or a journal file, made absolute."""
    if storage is None or storage.startswith("sqlite"):
        raise ClusterError("--tune --cluster needs a storage that every node reaches: --storage "
                           "postgresql://USER@HOST/DB, or a journal file on shared storage (--storage "
                           "/shared/studies/NAME.log); SQLite is one machine's file")
    from .tune import journal_path

    journal = journal_path(storage)
    return f"journal:{journal.resolve()}" if journal is not None else storage


def _tune_worker_task(base: RunConfig, dataset: Dataset, study_name: str, n_trials: int, storage: str,
                      pruner: str, tune_folds: list[int] | None, folds_dir: str, timeout: float | None,
                      threads: int) -> dict:
    """One Optuna worker on a node: joins the study (its own fresh sampler seed) and runs trials."""
    import ray
    import torch
    from threadpoolctl import threadpool_limits

    from .tune import work_on_study

    torch.set_num_threads(threads)
    with threadpool_limits(threads):
        opened = work_on_study(base, dataset, study_name, n_trials, storage, pruner, tune_folds, folds_dir, timeout)
    return {"sampler_seed": opened.sampler_seed, "created": opened.created,
            "node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname()}


def tune_on_cluster(ray, cluster: ClusterConfig, base: RunConfig, dataset: Dataset, study_name: str, n_trials: int,
                    storage: str | None, pruner: str, tune_folds: list[int] | None, folds_dir: str | Path,
                    timeout: float | None) -> tuple[str, list[dict]]:
    """Run ``cluster.workers`` Optuna workers as Ray tasks on one study; returns the storage they used
    and, per worker, its node and sampler seed. A worker whose node dies is retried by Ray: it joins
    the study again with a fresh seed, and the study's heartbeats (RDB storages) fail and retry the
    trial it had in flight."""
    storage = cluster_storage(storage)
    dataset = absolute_dataset(dataset)
    study_dir = Path(base.out).resolve()
    from .tune import journal_path

    journal = journal_path(storage)
    check_shared_storage(ray, [study_dir] + ([journal.parent] if journal else []), dataset_files(dataset))
    ask = placement(ray, cluster, base.device)
    workers = cluster.workers or min(n_trials, slots(ray, ask))
    from .console import console

    console.print(f"{workers} Optuna worker(s) on the cluster, each with {ask.num_cpus} CPU(s)"
                  f"{f' and {ask.num_gpus:g} GPU(s)' if ask.num_gpus else ''}", markup=False)
    base = replace(base, out=str(study_dir), device=ask.device)  # Ray may leave a GPU visible to a CPU task
    task = remote_task(ray, _tune_worker_task, ask)
    shared_dataset = ray.put(dataset)
    refs = [task.options(**ask.options(), name=f"optuna worker {k}").remote(
                base, shared_dataset, study_name, n_trials, storage, pruner, tune_folds,
                str(Path(folds_dir).resolve()), timeout, ask.num_cpus)
            for k in range(workers)]
    names = node_names(ray)
    done = []
    for k, result in enumerate(ray.get(refs)):
        result["node"] = names.get(result["node"], result["host"])
        console.print(f"worker {k}: {'created' if result['created'] else 'joined'} the study on node {result['node']}, "
                      f"sampler seed {result['sampler_seed']}", markup=False)
        done.append(result)
    return storage, done


def run_study_on_cluster(cluster: ClusterConfig, base: RunConfig, dataset: Dataset, study_name: str, n_trials: int,
                         storage: str | None, pruner: str = "median", tune_folds: list[int] | None = None,
                         folds_dir: str | Path = "folds", timeout: float | None = None):
    """``run_cv.py --tune --cluster``: the study's workers on the cluster, then its report here."""
    import optuna

    from .tune import check_study_arch, make_storage, report_study, write_tune_config

    arch = check_study_arch(base)
    cluster_storage(storage)  # refuse SQLite before anything is written
    write_tune_config(base, study_name, storage, pruner, tune_folds)
    with cluster_session(cluster.address) as ray:
        storage, _ = tune_on_cluster(ray, cluster, base, dataset, study_name, n_trials, storage, pruner, tune_folds,
                                     folds_dir, timeout)
    study = optuna.load_study(study_name=study_name, storage=make_storage(storage, Path(base.out)))
    report_study(study, base, arch, Path(base.out))
    return study
