"""A fold killed between any two of its file writes resumes to what an unbroken run writes.

last.pt is the fold's commit point: model.pt (the best epoch's weights) never runs ahead of it, and a
resume repairs model.pt and history.csv from it. The random streams training draws from are in it.
"""
import json
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import abaw.train as train
from abaw import demo
from abaw.config import RunConfig
from abaw.data import open_dataset
from abaw.folds import load_or_make_folds

# Validation CCC per epoch, scripted so that the runs below improve at epochs 1 and 3, not 2, on any
# hardware; the weights and predictions are trained for real.
SCRIPTED_VAL = [0.3, 0.2, 0.4]
# The trainer's writes in an unbroken run.
WRITES = ["last.pt", "model.pt", "history.csv",  # epoch 1, improved
          "last.pt", "history.csv",  # epoch 2
          "last.pt", "model.pt", "history.csv",  # epoch 3, improved
          "metrics.json"]  # the fold is complete
WRITERS = ("atomic_torch_save", "atomic_write_text", "atomic_write_json")


class Killed(BaseException):
    """Stands in for SIGKILL: like KeyboardInterrupt, nothing in the trainer catches it."""


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """An unbroken run, with its writes in order and the weights each epoch ended with."""
    tmp = tmp_path_factory.mktemp("resume")
    spec = demo.DemoSpec(n_train=4, n_val=2, n_test=1, min_frames=150, max_frames=250, mean_extra_frames=50)
    dataset = open_dataset(demo.generate(tmp / "root", spec))
    folds, _ = load_or_make_folds(dataset, 2, "grouped", 0, tmp / "folds")
    # tcn has dropout, so a resume that lost the RNG state would train differently
    config = RunConfig(arch=["tcn"], folds=2, epochs=len(SCRIPTED_VAL), patience=10, window=100, hop=100,
                       batch_size=4, lr=3e-3, seed=1, out=str(tmp / "unused"))
    ctx = SimpleNamespace(config=config, dataset=dataset, folds=folds, run=tmp / "clean", writes=[], weights={})

    def record(write):
        def recording(path, obj):
            ctx.writes.append(Path(path).name)
            if Path(path).name == "last.pt":
                ctx.weights[obj["state"]["epoch"]] = {k: v.clone() for k, v in obj["model"].items()}
            return write(path, obj)
        return recording

    with pytest.MonkeyPatch.context() as mp:
        for name in WRITERS:
            mp.setattr(train, name, record(getattr(train, name)))
        train_fold(ctx, ctx.run)
    return ctx


def fold_dir(run: Path) -> Path:
    return run / "tcn" / "fold0"


def train_fold(ctx, run: Path, lower_by: float = 0.0) -> train.FoldResult:
    """Train (or resume) the fold on the CPU (a GPU would not repeat itself exactly), validation scores
    scripted per epoch and lowered by ``lower_by``; the final scores of the best model are real."""
    trainer = train.FoldTrainer(ctx.config, "tcn", 0, ctx.dataset, ctx.folds, fold_dir(run),
                                device=torch.device("cpu"))
    epoch, final = [0], [False]
    real_loader, real_predict, real_evaluate = trainer._loader, trainer._predict_with_best, train.evaluate

    def loader(windows, e):  # called as each epoch starts
        epoch[0] = e
        return real_loader(windows, e)

    def predict_with_best(*args):
        final[0] = True
        return real_predict(*args)

    def evaluate(*args):
        scores, preds = real_evaluate(*args)
        return (scores if final[0] else {**scores, "mean": SCRIPTED_VAL[epoch[0]] - lower_by}), preds

    trainer._loader, trainer._predict_with_best = loader, predict_with_best
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, "evaluate", evaluate)
        return trainer.run()


@contextmanager
def killed_before_write(n: int):
    """The trainer dies (Killed) in place of its n-th file write, counting from 1."""
    calls = 0

    def wrap(write):
        def maybe_kill(path, obj):
            nonlocal calls
            calls += 1
            if calls == n:
                raise Killed(f"killed before writing {path}")
            return write(path, obj)
        return maybe_kill

    with pytest.MonkeyPatch.context() as mp:
        for name in WRITERS:
            mp.setattr(train, name, wrap(getattr(train, name)))
        yield


def kill(ctx, run: Path, n: int) -> None:
    with killed_before_write(n), pytest.raises(Killed):
        train_fold(ctx, run)
    assert not (fold_dir(run) / "metrics.json").exists()


def outputs(run: Path) -> dict:
    fold = fold_dir(run)
    metrics = json.loads((fold / "metrics.json").read_text())
    return {"history": pd.read_csv(fold / "history.csv").drop(columns="seconds"),
            "oof": pd.read_csv(fold / "oof.csv"),
            "test": pd.read_csv(run / "tcn" / "test" / "fold0.csv"),
            "metrics": {k: v for k, v in metrics.items() if k != "seconds"}}


def assert_best_is_what_metrics_name(ctx, run: Path) -> int:
    """model.pt holds the weights of metrics.json's best epoch; returns that epoch."""
    best_epoch = json.loads((fold_dir(run) / "metrics.json").read_text())["best_epoch"]
    best = torch.load(fold_dir(run) / "model.pt", weights_only=True)  # what the trainer writes loads safely
    assert best["epoch"] == best_epoch
    expected = ctx.weights[best_epoch]
    assert all(torch.equal(best["state_dict"][k], expected[k]) for k in expected)
    assert not (fold_dir(run) / "last.pt").exists()
    return best_epoch


def test_the_unbroken_run_writes_last_pt_first_in_each_epoch(clean):
    assert clean.writes == WRITES  # the kill points below are the gaps between these writes
    history = pd.read_csv(fold_dir(clean.run) / "history.csv")
    assert history["val_ccc"].tolist() == SCRIPTED_VAL and history["epoch"].tolist() == [1, 2, 3]


@pytest.mark.parametrize("n", range(1, len(WRITES) + 1), ids=lambda n: f"before-{n}-{WRITES[n - 1]}")
def test_a_fold_killed_between_any_two_writes_resumes_to_the_unbroken_result(clean, tmp_path, n):
    kill(clean, tmp_path, n)
    train_fold(clean, tmp_path)
    resumed, unbroken = outputs(tmp_path), outputs(clean.run)
    pd.testing.assert_frame_equal(resumed.pop("history"), unbroken.pop("history"))
    pd.testing.assert_frame_equal(resumed.pop("oof"), unbroken.pop("oof"))
    pd.testing.assert_frame_equal(resumed.pop("test"), unbroken.pop("test"))
    assert resumed == unbroken
    assert assert_best_is_what_metrics_name(clean, tmp_path) == 3


@pytest.mark.parametrize("n", range(1, len(WRITES) + 1), ids=lambda n: f"before-{n}-{WRITES[n - 1]}")
def test_model_pt_matches_the_resumed_state_when_reruns_score_lower(clean, tmp_path, n):
    """On a GPU a rerun epoch may score lower than before the kill: model.pt must still be the best
    epoch that last.pt (and then metrics.json) names, never weights from an epoch it never committed."""
    kill(clean, tmp_path, n)
    train_fold(clean, tmp_path, lower_by=10)
    # No epoch after the resume beats the committed ones; with none committed, all are lowered alike.
    scores = SCRIPTED_VAL[:WRITES[:n - 1].count("last.pt")] or SCRIPTED_VAL
    expected = 1 + scores.index(max(scores))
    assert assert_best_is_what_metrics_name(clean, tmp_path) == expected


def test_a_model_pt_that_last_pt_cannot_repair_is_a_clear_error(clean, tmp_path):
    kill(clean, tmp_path, WRITES.index("last.pt", 5) + 1)  # before epoch 3's last.pt: best is epoch 1 of 2
    fold = fold_dir(tmp_path)
    (fold / "model.pt").unlink()  # the best weights are now in no file
    with pytest.raises(train.CheckpointMismatch, match=re.escape(
            f"{fold}: last.pt resumes after epoch 2 with epoch 1 as the best, but model.pt holds nothing "
            f"(missing); delete {fold} to train this fold again")):
        train_fold(clean, tmp_path)


# The GPU random stream, tested with CUDA's calls faked: the CPU path never touches CUDA.

def fake_cuda_rng(monkeypatch) -> list:
    """CUDA's RNG calls, recorded; getting a stream returns [7, 7]."""
    calls = []

    def get_rng_state(device):
        calls.append(("get", device))
        return torch.tensor([7, 7], dtype=torch.uint8)

    def set_rng_state(state, device):
        calls.append(("set", state.tolist(), device))

    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_rng_state)
    return calls


def tiny_optimisation():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def test_a_gpu_fold_checkpoints_the_random_stream_of_its_own_gpu(clean, tmp_path, monkeypatch):
    calls = fake_cuda_rng(monkeypatch)
    trainer = train.FoldTrainer(clean.config, "tcn", 0, clean.dataset, clean.folds, tmp_path,
                                device=torch.device("cuda", 1))
    trainer._save_checkpoint(*tiny_optimisation(), {"epoch": 1})
    saved = torch.load(tmp_path / "last.pt", weights_only=True)  # what the trainer writes loads safely
    assert calls == [("get", torch.device("cuda", 1))] and saved["cuda_rng"].tolist() == [7, 7]
    assert torch.equal(saved["rng"], torch.get_rng_state())


def test_a_cpu_fold_checkpoints_only_the_cpu_stream(monkeypatch):
    calls = fake_cuda_rng(monkeypatch)
    assert set(train._rng_state(torch.device("cpu"))) == {"rng"} and calls == []


def test_a_gpu_checkpoint_resumes_its_stream_on_the_gpu_the_fold_has_now(monkeypatch):
    calls = fake_cuda_rng(monkeypatch)
    cpu = torch.manual_seed(5).get_state()
    torch.manual_seed(6)
    train._restore_rng({"rng": cpu, "cuda_rng": torch.tensor([3, 4], dtype=torch.uint8)}, torch.device("cuda", 0))
    assert calls == [("set", [3, 4], torch.device("cuda", 0))]  # saved on cuda:1 above; the pool gave cuda:0
    assert torch.equal(torch.get_rng_state(), cpu)


@pytest.mark.parametrize("saved_on, resumed_on", [("cuda", "cpu"), ("cpu", "cuda")])
def test_a_checkpoint_resumed_on_the_other_kind_of_device_restores_the_cpu_stream_only(monkeypatch, saved_on,
                                                                                        resumed_on):
    calls = fake_cuda_rng(monkeypatch)
    cpu = torch.manual_seed(5).get_state()
    saved = {"rng": cpu, **({"cuda_rng": torch.tensor([3, 4], dtype=torch.uint8)} if saved_on == "cuda" else {})}
    torch.manual_seed(6)
    train._restore_rng(saved, torch.device(resumed_on))
    assert calls == [] and torch.equal(torch.get_rng_state(), cpu)
