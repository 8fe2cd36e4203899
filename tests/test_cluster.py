"""Folds and tuning workers on a real Ray cluster: a head node and a second node on loopback.

The cluster is started here with ``ray start`` (two processes, one CPU each), as a user starts one on
a Slurm allocation. Where Ray is not installed these tests skip; under CI (``CI=true``) they fail.
"""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
from optuna.trial import TrialState

from abaw import cli
from abaw.cluster import ClusterConfig, ClusterError, check_shared_storage
from abaw.loopback import LoopbackCluster, cluster_env, ray_executable

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ray


# One thread per fold, on one machine as on the cluster; the cluster's own auth token (abaw/loopback.py).
ENV = cluster_env(threads=1)


def require_ray() -> None:
    if ray_executable() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the Ray tests: install the extra, pip install -e '.[cluster]'")
        pytest.skip("Ray is not installed (pip install -e '.[cluster]')")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A head node and a second node ("node2") joined to it, one CPU each; stopped after the module."""
    require_ray()
    with LoopbackCluster(tmp_path_factory.mktemp("ray"), ENV, nodes=2) as cluster:
        yield cluster


CV_ARGS = ["--arch", "mamba_va", "tcn", "--folds", "2", "--epochs", "3", "--patience", "10", "--window", "200",
           "--hop", "100", "--batch-size", "8"]


def cv(root, cwd: Path, *extra) -> list[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    return [sys.executable, str(REPO / "run_cv.py"), "--data-root", str(root), "--out", "run", *CV_ARGS, *extra]




@pytest.fixture(scope="module")
def one_machine_run(small_root, tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("one-machine")
    out = subprocess.run(cv(small_root, cwd), cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return cwd / "run"


WALL_CLOCK = "seconds"  # the only field two runs of the same fold write differently


def run_files(folder: Path) -> dict[str, object]:
    """Every file of a run folder, comparable across runs: wall-clock seconds dropped, checkpoints as tensors."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = str(path.relative_to(folder))
        if path.name == "metrics.json":
            files[name] = {k: v for k, v in json.loads(path.read_text()).items() if k != WALL_CLOCK}
        elif path.name == "history.csv":
            files[name] = pd.read_csv(path).drop(columns=[WALL_CLOCK]).to_csv(index=False)
        elif path.suffix == ".pt":
            saved = torch.load(path, weights_only=True)
            files[name] = {**saved, "state_dict": {k: v.numpy().tobytes() for k, v in saved["state_dict"].items()}}
        else:
            files[name] = path.read_bytes()
    return files


def assert_same_run(a: Path, b: Path) -> None:
    files_a, files_b = run_files(a), run_files(b)
    assert sorted(files_a) == sorted(files_b)
    different = [name for name in files_a if files_a[name] != files_b[name]]
    assert not different, f"files that differ between {a} and {b}: {different}"


def test_a_cv_on_the_cluster_writes_the_files_of_a_one_machine_run(ray_cluster, small_root, one_machine_run,
                                                                 tmp_path):
    out = subprocess.run(cv(small_root, tmp_path, "--cluster", ray_cluster.address), cwd=tmp_path, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    nodes = set(re.findall(r"fold \d: running on node (\w+) \(pid", out.stdout))
    assert nodes == {"head", "node2"}, out.stdout  # the folds were spread over both nodes, and the log says where
    assert_same_run(tmp_path / "run", one_machine_run)
    assert not list((tmp_path / "run").rglob(".abaw-cluster-check*"))  # the storage check cleans up after itself


def test_a_fold_whose_worker_is_killed_is_retried_and_resumes(ray_cluster, small_root, one_machine_run, tmp_path):
    proc = subprocess.Popen(cv(small_root, tmp_path, "--cluster", ray_cluster.address), cwd=tmp_path, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    placed: dict[str, tuple[str, int]] = {}
    killed, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if m := re.match(r"(\w+ fold \d): running on node (\w+) \(pid (\d+)\)", line):
            placed[m[1]] = (m[2], int(m[3]))
        m = re.match(r"(\w+ fold \d): epoch 1/3", line)
        if m and killed is None and placed.get(m[1], ("",))[0] == "node2":
            killed = m[1]
            os.kill(placed[killed][1], signal.SIGKILL)  # the worker process running that fold, mid-fold
    assert proc.wait(timeout=600) == 0, "".join(lines)
    assert killed is not None, "no fold ran on node2:\n" + "".join(lines)
    log = "".join(lines)
    assert log.count(f"{killed}: running on node") == 2, log  # Ray started the fold again ...
    assert re.search(rf"{killed}: resumed after epoch [1-3]", log), log  # ... from its last.pt
    assert_same_run(tmp_path / "run", one_machine_run)


def test_a_study_on_the_cluster_loses_no_trial_and_repeats_no_parameters(ray_cluster, small_root, tmp_path):
    storage = tmp_path / "studies" / "shared.log"
    args = [sys.executable, str(REPO / "run_cv.py"), "--data-root", str(small_root), "--tune", "--arch", "linear",
            "--study", "shared", "--storage", str(storage), "--n-trials", "6", "--folds", "3", "--tune-folds", "0",
            "--epochs", "2", "--window", "200", "--pruner", "none", "--out", str(tmp_path / "shared"),
            "--cluster", ray_cluster.address, "--workers", "2"]
    out = subprocess.run(args, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    workers = re.findall(r"worker \d: (created|joined) the study on node (\w+), sampler seed (\d+)", out.stdout)
    assert sorted(role for role, _, _ in workers) == ["created", "joined"], out.stdout
    assert len({seed for _, _, seed in workers}) == 2  # each worker samples with a seed of its own
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    study = optuna.load_study(study_name="shared", storage=JournalStorage(JournalFileBackend(str(storage))))
    assert sorted(t.number for t in study.trials) == list(range(len(study.trials))) and len(study.trials) >= 6
    assert all(t.state == TrialState.COMPLETE for t in study.trials)  # none lost, none left running
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(params)) == len(params)
    assert (tmp_path / "shared" / "best_config.yaml").exists()


def tiny_cv(root, out, *extra) -> list[str]:
    return ["--data-root", str(root), "--out", str(out), "--arch", "linear", "--folds", "2", "--epochs", "1",
            "--window", "200", "--hop", "200", *extra]


def run_tiny_cv(root, cwd: Path, address: str) -> subprocess.CompletedProcess:
    code = f"import sys; from abaw import cli; sys.exit(cli.run_cv_main({tiny_cv(root, 'run', '--cluster', address)!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def check_tiny_cv(out: subprocess.CompletedProcess, run: Path) -> None:
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(re.findall(r"linear fold \d: running on node", out.stdout)) == 2, out.stdout
    assert list(pd.read_csv(run / "summary.csv").status) == ["completed"] * 3


def test_a_cv_runs_through_ray_client(ray_cluster, small_root, tmp_path):
    check_tiny_cv(run_tiny_cv(small_root, tmp_path, ray_cluster.client), tmp_path / "run")


def test_a_cv_runs_on_a_cluster_of_its_own_with_cluster_local(small_root, tmp_path):
    require_ray()
    check_tiny_cv(run_tiny_cv(small_root, tmp_path, "local"), tmp_path / "run")


# -- without a cluster ----------------------------------------------------------------------------

def test_without_cluster_ray_is_never_imported(small_root, tmp_path):
    code = (f"import sys; from abaw import cli; code = cli.run_cv_main({tiny_cv(small_root, 'run')!r}); "
            "assert code == 0, code; assert 'ray' not in sys.modules, 'ray was imported'")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("flags, words", [
    (["--workers", "2"], "only apply with --cluster"),
    (["--gpus-per-fold", "0.5"], "only apply with --cluster"),
    (["--cluster", "auto", "--gpus-per-fold", "2"], "a fold trains on one GPU"),
    (["--cluster", "auto", "--cpus-per-fold", "0"], "at least one CPU"),
    (["--cluster", "auto", "--workers", "2"], "Optuna workers of --tune"),
    (["--cluster", "auto", "--tune"], "SQLite is one machine's file"),
])
def test_cluster_options_are_checked_before_anything_starts(small_root, tmp_path, capsys, flags, words):
    code = cli.run_cv_main(["--data-root", str(small_root), "--out", str(tmp_path / "run"), "--arch", "linear",
                            *flags])
    assert code == 2
    assert words in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("scheme", ["", "ray://"])
def test_an_address_where_nothing_listens_is_a_clear_error_at_once(small_root, tmp_path, capsys, scheme):
    require_ray()
    from abaw.loopback import free_port

    address = f"{scheme}127.0.0.1:{free_port()}"
    code = cli.run_cv_main(tiny_cv(small_root, tmp_path / "run", "--cluster", address))
    assert code == 2
    assert f"--cluster {address}: nothing answers at 127.0.0.1:" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


class TwoNodes:
    """A stand-in for the ``ray`` module with two nodes, where ``hidden`` folders are missing on node2
    (as on a node without the shared disk): node2's task runs while they are moved away."""

    IDS = {"head": "a1" * 28, "node2": "b2" * 28}  # Ray's node ids: 56 hex digits

    def __init__(self, hidden: list[Path]):
        self.hidden = hidden

    def nodes(self):
        return [{"NodeID": i, "NodeName": n, "NodeManagerAddress": "10.0.0.1", "Alive": True, "Resources": {}}
                for n, i in self.IDS.items()]

    def remote(self, **_):
        hidden = self.hidden

        class Task:
            def __init__(self, fn, node=None):
                self.fn, self.node = fn, node

            def options(self, scheduling_strategy):
                return Task(self.fn, scheduling_strategy.node_id)

            def remote(self, *args):
                if self.node != TwoNodes.IDS["node2"]:
                    return self.fn(*args)
                for folder in hidden:
                    folder.rename(folder.with_name(folder.name + ".away"))
                try:
                    return self.fn(*args)
                finally:
                    for folder in hidden:
                        folder.with_name(folder.name + ".away").rename(folder)

        return Task

    def get(self, value, timeout=None):
        return value


def test_a_node_that_does_not_see_the_run_folder_is_named_and_nothing_starts(tmp_path):
    require_ray()
    run, data = tmp_path / "run", tmp_path / "data"
    data.mkdir()
    (data / "v.npy").write_bytes(b"x" * 10)
    with pytest.raises(ClusterError) as err:
        check_shared_storage(TwoNodes([run, data]), [run], [data / "v.npy"])
    message = str(err.value)
    assert "node node2" in message and str(run) in message and str(data / "v.npy") in message
    assert "node head" not in message
    assert not run.exists()  # made for the check, removed when refused
    check_shared_storage(TwoNodes([]), [run], [data / "v.npy"])  # every node sees both: no error


class Nodes:
    """A stand-in for the ``ray`` module: alive nodes with these resources."""

    def __init__(self, *resources: dict):
        self.resources = resources

    def nodes(self):
        return [{"Alive": True, "Resources": r} for r in self.resources]


def test_a_fold_asking_more_than_any_node_has_is_refused():
    from abaw.cluster import placement

    cpus = Nodes({"CPU": 4.0}, {"CPU": 8.0})
    assert placement(cpus, ClusterConfig("auto", cpus_per_fold=8), "auto") == placement(cpus, ClusterConfig(
        "auto", cpus_per_fold=8), "cpu")
    assert placement(cpus, ClusterConfig("auto", cpus_per_fold=8), "auto").device == "cpu"
    with pytest.raises(ClusterError, match="largest has 8 CPUs"):
        placement(cpus, ClusterConfig("auto", cpus_per_fold=16), "auto")
    with pytest.raises(ClusterError, match="no node of the cluster has a GPU"):
        placement(cpus, ClusterConfig("auto"), "cuda")
    with pytest.raises(ClusterError, match="Ray chooses each fold's GPU"):
        placement(Nodes({"CPU": 8.0, "GPU": 2.0}), ClusterConfig("auto"), "cuda:1")


def test_on_a_gpu_cluster_each_fold_asks_for_its_share_of_a_gpu():
    from abaw.cluster import Placement, placement, slots

    gpus = Nodes({"CPU": 16.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 4.0}, {"CPU": 2.0})  # and a CPU-only head node
    whole = placement(gpus, ClusterConfig("auto", cpus_per_fold=2), "auto")
    assert whole == Placement(num_cpus=2, num_gpus=1.0, device="cuda")
    assert slots(gpus, whole) == 8  # one fold per GPU: the GPUs, not the 32 + 2 CPUs, are the limit
    half = placement(gpus, ClusterConfig("auto", gpus_per_fold=0.5, cpus_per_fold=2), "cuda")
    assert half.num_gpus == 0.5 and slots(gpus, half) == 16
    assert slots(gpus, placement(gpus, ClusterConfig("auto", gpus_per_fold=0.5, cpus_per_fold=4), "auto")) == 8
    on_cpus = placement(gpus, ClusterConfig("auto", cpus_per_fold=2), "cpu")  # --device cpu: the GPUs are not asked
    assert on_cpus == Placement(num_cpus=2, num_gpus=0.0, device="cpu") and slots(gpus, on_cpus) == 17


def test_a_gpu_fold_gets_a_fresh_worker_process_each_time():
    """A reused worker would keep the CUDA context of the first GPU it was given."""
    ray = pytest.importorskip("ray")
    from abaw.cluster import Placement, remote_task

    def fold():
        return None

    assert remote_task(ray, fold, Placement(1, 0.5, "cuda"))._default_options["max_calls"] == 1
    assert remote_task(ray, fold, Placement(1, 0.0, "cpu"))._default_options["max_calls"] == 0
