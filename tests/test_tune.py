"""Optuna studies: pruning, failures recorded with reasons, best config, shared storages, heartbeats."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

import abaw.tune as tune
from abaw import cli
from abaw.config import RunConfig
from abaw.data import open_dataset

REPO = Path(__file__).resolve().parents[1]


def base_config(out, **kw):
    return RunConfig(arch=["linear"], folds=3, epochs=3, window=200, hop=200, out=str(out), **kw)


@pytest.fixture
def scripted_lr(monkeypatch):
    """Trial 2 has a bad config (NaN lr); trials 4+ learn nothing (so the pruner must stop them)."""
    real = tune.suggest_training

    def suggest(trial):
        params = real(trial)
        params["window"] = 200
        if trial.number == 2:
            params["lr"] = float("nan")
        elif trial.number >= 4:
            params["lr"] = 1e-9
        else:
            params["lr"] = 3e-3
        return params

    monkeypatch.setattr(tune, "suggest_training", suggest)


def test_study_prunes_records_failures_and_writes_best_config(small_root, tmp_path, scripted_lr):
    dataset = open_dataset(small_root)
    study = tune.run_study(base_config(tmp_path / "s"), dataset, "s", n_trials=6, tune_folds=[0, 1],
                           folds_dir=tmp_path / "folds")
    states = {t.number: t.state for t in study.trials}
    assert states[2] == TrialState.FAIL
    assert "Invalid learning rate: nan" in study.trials[2].user_attrs["fail_reason"]
    assert states[4] == states[5] == TrialState.PRUNED
    assert states[0] == states[1] == TrialState.COMPLETE

    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    for t in complete:  # fold index * epochs + epoch: two folds x three epochs, no step reported twice
        assert sorted(t.intermediate_values) == [0, 1, 2, 3, 4, 5]
    pruned = study.trials[4]
    assert max(pruned.intermediate_values) < 5

    best = tmp_path / "s" / "best_config.yaml"
    config = cli.resolve(cli.run_cv_parser().parse_args(["--config", str(best)]))
    assert config.lr == 3e-3 and config.arch == ["linear"] and config.window == 200
    assert config.weight_decay == study.best_trial.params["weight_decay"]
    assert config.out.endswith("s-best")
    assert (tmp_path / "s" / "optimization_history.png").stat().st_size > 1000
    assert (tmp_path / "s" / "param_importances.png").exists()
    assert not (tmp_path / "s" / "trials").exists() or not any((tmp_path / "s" / "trials").iterdir())


def study_of(config, dataset, name, n_trials, tmp_path, **kw):
    return tune.run_study(config, dataset, name, n_trials=n_trials, tune_folds=kw.pop("tune_folds", [0]),
                          folds_dir=tmp_path / "folds", pruner="none", **kw)


@pytest.mark.parametrize("change, words", [
    ({"stop_split": 0.2}, "objective: 'mean validation CCC' in the study, 'mean stop-split CCC' now"),
    ({"seed": 3}, "folds: "),                       # another fold table (a --subjects change does the same)
    ({"tune_folds": [1]}, "tune_folds: [0] in the study, [1] now"),
])
def test_joining_a_study_whose_trials_were_scored_otherwise_is_refused(small_root, tmp_path, change, words):
    dataset = open_dataset(small_root)
    study_of(base_config(tmp_path / "s"), dataset, "same", 0, tmp_path)  # creates the study, runs no trial
    tune_folds = change.pop("tune_folds", [0])
    with pytest.raises(ValueError, match="was run with other settings") as error:
        study_of(base_config(tmp_path / "s", **change), dataset, "same", 0, tmp_path, tune_folds=tune_folds)
    assert words in str(error.value)
    study_of(base_config(tmp_path / "s"), dataset, "same", 0, tmp_path)  # the same settings join


def test_a_rerun_continues_the_study_with_parameters_of_its_own(small_root, tmp_path):
    dataset = open_dataset(small_root)
    config = base_config(tmp_path / "s", seed=7)
    study_of(config, dataset, "again", 3, tmp_path)
    study = study_of(config, dataset, "again", 6, tmp_path)  # same default SQLite study, same seed
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4, 5]
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 6  # the rerun replays nothing
    seeds = [t.user_attrs["sampler_seed"] for t in study.trials]
    assert seeds[:3] == [7, 7, 7] and seeds[3] == seeds[4] == seeds[5] != 7  # creator, then the joiner


def test_a_new_study_samples_reproducibly_from_the_run_seed(small_root, tmp_path):
    dataset = open_dataset(small_root)
    first = {name: study_of(base_config(tmp_path / name, seed=seed), dataset, name, 1, tmp_path).trials[0].params
             for name, seed in (("a", 7), ("b", 7), ("c", 8))}
    assert first["a"] == first["b"] != first["c"]


def test_with_a_stop_split_the_objective_is_the_stop_split_ccc(small_root, tmp_path, monkeypatch):
    dataset = open_dataset(small_root)
    results = []
    real_run = tune.FoldTrainer.run
    monkeypatch.setattr(tune.FoldTrainer, "run", lambda self: results.append(real_run(self)) or results[-1])
    config = base_config(tmp_path / "s", stop_split=0.2)
    trial = study_of(config, dataset, "stop", 1, tmp_path, tune_folds=[0, 1]).trials[0]
    reported = trial.intermediate_values  # per epoch, on the stop split; step = fold index * epochs + epoch
    best_stop = [max(v for step, v in reported.items() if step // config.epochs == i) for i in (0, 1)]
    assert [r.stop_ccc for r in results] == pytest.approx(best_stop)
    assert trial.value == pytest.approx(sum(best_stop) / 2)
    assert trial.value != pytest.approx(sum(r.mean for r in results) / 2)  # not the folds' own videos


def tune_worker(root, storage, study, tmp_path, n_trials, env=None):
    """``run_cv.py --tune`` in a subprocess; ``storage`` None: no --storage flag (then $ABAW_STORAGE, if set)."""
    args = [sys.executable, str(REPO / "run_cv.py"), "--data-root", str(root), "--tune", "--arch", "linear",
            "--study", study, *(["--storage", storage] if storage else []), "--n-trials", str(n_trials), "--folds", "3",
            "--tune-folds", "0", "--epochs", "2", "--window", "200", "--pruner", "none",
            "--out", str(tmp_path / study)]
    return subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def check_shared_study(storage_url, study_name, n_trials, tmp_path):
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers)) and len(numbers) >= n_trials
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert (tmp_path / study_name / "best_config.yaml").exists()


def check_one_creator(outputs):
    """Workers racing to open a new study: exactly one creates it, and each samples with its own seed."""
    opened = [re.search(r"study '\w+' (created|joined): sampler seed (\d+)", out).groups() for out in outputs]
    assert sorted(role for role, _ in opened) == ["created"] + ["joined"] * (len(outputs) - 1)
    assert len({seed for _, seed in opened}) == len(outputs)


def test_two_workers_share_a_journal_file(small_root, tmp_path):
    storage = str(tmp_path / "journal.log")
    workers = [tune_worker(small_root, storage, "shared", tmp_path, 4) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), [o[-3000:] for o in outputs]
    check_one_creator(outputs)
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    check_shared_study(JournalStorage(JournalFileBackend(storage)), "shared", 4, tmp_path)


def postgres_url() -> str:
    """The CI server's URL (its superuser's password, if any, in PGPASSWORD: never in the URL)."""
    url = os.environ.get("ABAW_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("CI must run the PostgreSQL test: .ci/run should have set ABAW_TEST_POSTGRES_URL")
        pytest.skip("no PostgreSQL server: set ABAW_TEST_POSTGRES_URL (bash .ci/run starts one)")
    return url


@pytest.mark.postgres
def test_two_workers_share_a_postgres_study(small_root, tmp_path):
    url = postgres_url()
    name = f"pg{os.getpid()}"
    workers = [tune_worker(small_root, url, name, tmp_path, 4) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), [o[-3000:] for o in outputs]
    check_shared_study(url, name, 4, tmp_path)
    check_one_creator(outputs)
    study = optuna.load_study(study_name=name, storage=url)
    assert len({t.datetime_start for t in study.trials}) == len(study.trials)


def test_a_killed_workers_trial_is_failed_and_retried(small_root, tmp_path):
    storage = f"sqlite:///{tmp_path / 'hb.db'}"
    env = {"ABAW_HEARTBEAT_SECONDS": "1"}
    first = tune_worker(small_root, storage, "hb", tmp_path, 2, env)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            trials = optuna.load_study(study_name="hb", storage=storage).trials
            if trials and trials[0].state == TrialState.RUNNING and trials[0].user_attrs.get("config"):
                break  # mid-trial: its parameters are drawn and training has started
        except KeyError:
            pass
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(5)  # past the grace period (4 heartbeats)
    second = tune_worker(small_root, storage, "hb", tmp_path, 2, env)
    out = second.communicate(timeout=600)[0]
    assert second.returncode == 0, out
    study = optuna.load_study(study_name="hb", storage=storage)
    killed = study.trials[0]
    assert killed.state == TrialState.FAIL
    retried = [t for t in study.trials if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 0]
    assert retried and retried[0].state == TrialState.COMPLETE and retried[0].params == killed.params


@pytest.mark.parametrize("arch", __import__("abaw.models", fromlist=["list_models"]).list_models(kind="neural"))
def test_every_architectures_search_space_builds_working_models(arch):
    import torch

    from abaw.models import create_model

    dims = {"visual": 24, "audio": 8, "text": 6}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(6):
        trial = study.ask()
        params = tune.suggest_architecture(trial, arch, "demo")
        model = create_model(arch, size="demo", input_dims=dims, **params)
        out = model({m: torch.randn(2, 40, d) for m, d in dims.items()}, torch.ones(2, 40, dtype=torch.bool))
        assert out.shape == (2, 40, 2) and torch.isfinite(out).all()
        seen.add(repr(sorted(params.items())))
    assert arch == "linear" or len(seen) > 1  # the space really varies the architecture's own sizes


def test_a_classical_arch_is_not_tuned(small_root, tmp_path, capsys):
    with pytest.raises(ValueError, match="context_ridge is a classical model"):
        tune.run_study(RunConfig(arch=["context_ridge"], folds=3, out=str(tmp_path / "s")), open_dataset(small_root),
                       "s", n_trials=2, folds_dir=tmp_path / "folds")
    assert not (tmp_path / "s").exists()
    code = cli.run_cv_main(["--data-root", str(small_root), "--tune", "--arch", "context_ridge",
                            "--out", str(tmp_path / "cli")])
    out = capsys.readouterr().out
    assert code == 2 and "error: context_ridge is a classical model" in out and "without --tune" in out


def test_tune_takes_the_default_network_only_when_no_arch_was_named(small_root, tmp_path, capsys, monkeypatch):
    studied = []
    monkeypatch.setattr(tune, "run_study", lambda config, *a, **k: studied.append(config.arch))
    assert cli.run_cv_main(["--data-root", str(small_root), "--tune", "--out", str(tmp_path / "a")]) == 0
    assert studied == [["mamba_va"]]  # the default zoo's network; the ridge chooses its penalty itself
    config = tmp_path / "two.yaml"
    config.write_text("arch: [mamba_va, context_ridge]\n")
    for named in (["--arch", "mamba_va", "context_ridge"], ["--config", str(config)]):
        assert cli.run_cv_main(["--data-root", str(small_root), "--tune", "--out", str(tmp_path / "b"), *named]) == 0
        assert studied[-1] == ["mamba_va", "context_ridge"]  # named: passed on, and refused by run_study


def test_the_study_folder_keeps_no_storage_password(small_root, tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(tune, "_create_or_join", refuse)  # no server needed: the config is written first
    with pytest.raises(Stop):
        tune.run_study(RunConfig(arch=["linear"], folds=3, out=str(tmp_path / "s")), open_dataset(small_root), "s",
                       n_trials=1, storage="postgresql://abaw:hunter2@db.lab/studies", folds_dir=tmp_path / "folds")
    written = (tmp_path / "s" / "tune_config.yaml").read_text()
    assert "postgresql://abaw:***@db.lab/studies" in written and "hunter2" not in written


@pytest.mark.postgres
def test_no_password_reaches_a_file_a_table_or_a_message(small_root, tmp_path, monkeypatch):
    """A study on a role with a password, the URL given on the command line and then in $ABAW_STORAGE:
    the password is in no file the runs wrote, no table or attribute of the study, nothing printed."""
    import json
    import secrets
    from urllib.parse import urlsplit

    import psycopg

    admin = postgres_url()
    secret, role = secrets.token_hex(12), f"abaw_cred_{os.getpid()}"
    with psycopg.connect(admin, autocommit=True) as conn:  # a database of its own: no other test's tables
        conn.execute(f"DROP DATABASE IF EXISTS {role}")  # left by an earlier run under this pid
        conn.execute(f"DROP ROLE IF EXISTS {role}")
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{secret}'")
        conn.execute(f"CREATE DATABASE {role} OWNER {role}")
    server = urlsplit(admin)
    url = f"postgresql://{role}:{secret}@{server.hostname}:{server.port}/{role}"
    monkeypatch.delenv("PGPASSWORD", raising=False)  # the workers log in with the URL's password alone
    on_command_line = tune_worker(small_root, url, "cred", tmp_path, 2)
    printed = on_command_line.communicate(timeout=600)[0]
    from_env = tune_worker(small_root, None, "cred_env", tmp_path, 2, {"ABAW_STORAGE": url})
    printed += from_env.communicate(timeout=600)[0]
    assert on_command_line.returncode == 0 and from_env.returncode == 0, printed[-3000:]
    assert secret not in printed
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "best_config.yaml" for p in written) and any(p.suffix == ".png" for p in written)
    assert [p for p in written if secret.encode() in p.read_bytes()] == []
    assert f"postgresql://{role}:***@" in (tmp_path / "cred_env" / "tune_config.yaml").read_text()
    for name in ("cred", "cred_env"):
        study = optuna.load_study(study_name=name, storage=url)
        stored = json.dumps([study.user_attrs] +
                            [[t.params, t.user_attrs, t.system_attrs] for t in study.trials], default=str)
        assert len(study.trials) == 2 and secret not in stored
