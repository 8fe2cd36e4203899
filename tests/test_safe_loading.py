"""Checkpoints are never unpickled unsafely: a pickle that would run code is refused wherever a file is
loaded (a fold's last.pt and model.pt, extract --weights, pretrain --init and last.pt); a damaged fold
checkpoint makes the fold start over (last.pt) or be repaired (model.pt), saying so."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image

import abaw.train as train
from abaw import demo
from abaw.checkpoint import UnreadableCheckpoint, UnsafeCheckpoint, load_checkpoint
from abaw.config import RunConfig
from abaw.cv import CVProgress
from abaw.data import open_dataset
from abaw.extract.__main__ import main as extract_main
from abaw.folds import load_or_make_folds
from abaw.pretrain.__main__ import main as pretrain_main
from abaw.pretrain.common import load_init
from abaw.pretrain.mae import MAEOptions, train_mae
from abaw.stand_ins import VISUAL_BACKBONE

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Payload:
    """Unpickling this calls ``open(marker, "w")``: a file appears if the pickle is ever loaded unsafely."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def malicious(path: Path, marker: Path) -> Path:
    """A checkpoint that looks like weights but carries the payload."""
    torch.save({"model": {"weight": torch.zeros(2)}, "extra": Payload(marker)}, path)
    return path


def test_the_payload_runs_when_unpickled_unsafely(tmp_path):
    """The check below is meaningful: the same file loaded the unsafe way does create the marker."""
    path = malicious(tmp_path / "evil.pt", tmp_path / "marker")
    torch.load(path, weights_only=False)["extra"].close()
    assert (tmp_path / "marker").exists()


def test_a_pickle_that_would_run_code_is_refused_with_what_to_do(tmp_path):
    path = malicious(tmp_path / "evil.pt", tmp_path / "marker")
    with pytest.raises(UnsafeCheckpoint) as refused:
        load_checkpoint(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: cannot load the checkpoint with torch.load(weights_only=True)")
    assert "could run code" in message and "re-save its state dict" in message and ".safetensors" in message
    assert not (tmp_path / "marker").exists()


def test_damaged_and_missing_files_are_told_apart(tmp_path):
    whole = tmp_path / "whole.pt"
    torch.save({"w": torch.arange(1000.0)}, whole)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint " * 20)
    for path in (truncated, garbage):
        with pytest.raises(UnreadableCheckpoint, match=re.escape(f"{path}: cannot load the checkpoint: ") +
                           r".*\(the file is truncated, corrupt or not a torch checkpoint\)"):
            load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")
    assert torch.equal(load_checkpoint(whole)["w"], torch.arange(1000.0))


# ---------------------------------------------------------------------------------------------------
# a fold folder
# ---------------------------------------------------------------------------------------------------

class Stop(BaseException):
    """Stands in for a kill after the first epoch's files are written."""


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A 2-epoch tcn fold stopped after epoch 1: last.pt, model.pt (epoch 1, the best) and history.csv."""
    tmp = tmp_path_factory.mktemp("safe")
    spec = demo.DemoSpec(n_train=4, n_val=2, n_test=1, min_frames=150, max_frames=250, mean_extra_frames=50)
    dataset = open_dataset(demo.generate(tmp / "root", spec))
    folds, _ = load_or_make_folds(dataset, 2, "grouped", 0, tmp / "folds")
    config = RunConfig(arch=["tcn"], folds=2, epochs=2, patience=10, window=100, hop=100, batch_size=4,
                       lr=3e-3, seed=1, out=str(tmp / "unused"))

    def stop(epoch, val):
        raise Stop

    trainer = train.FoldTrainer(config, "tcn", 0, dataset, folds, tmp / "run" / "tcn" / "fold0",
                                device=torch.device("cpu"), epoch_callback=stop)
    with pytest.raises(Stop):
        trainer.run()
    return config, dataset, folds, trainer.out


def rerun(interrupted, run: Path):
    """A trainer for the fold under ``run`` (a damaged copy of the interrupted one) and the events it emits."""
    config, dataset, folds, _ = interrupted
    events = []
    trainer = train.FoldTrainer(config, "tcn", 0, dataset, folds, run / "tcn" / "fold0",
                                device=torch.device("cpu"), progress=events.append)
    return trainer, events


def copy_fold(interrupted, tmp_path) -> Path:
    fold = tmp_path / "tcn" / "fold0"
    shutil.copytree(interrupted[3], fold)
    assert {p.name for p in fold.iterdir()} >= {"last.pt", "model.pt", "history.csv"}
    return fold


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


DAMAGES = {  # file, how it is damaged, the note the fold shows, what the message says
    "truncated-last.pt": ("last.pt", truncate, "restarted", "is unreadable (truncated or corrupt"),
    "malicious-last.pt": ("last.pt", "payload", "restarted", "is unsafe to load"),
    "garbage-model.pt": ("model.pt", lambda p: p.write_bytes(b"\x00garbage" * 50), "repaired",
                         "is unreadable (truncated or corrupt"),
    "malicious-model.pt": ("model.pt", "payload", "repaired", "is unsafe to load"),
}


@pytest.mark.parametrize("case", DAMAGES)
def test_a_damaged_fold_checkpoint_restarts_or_repairs_the_fold_and_says_so(interrupted, tmp_path, case):
    name, damage, note, said = DAMAGES[case]
    fold = copy_fold(interrupted, tmp_path)
    marker = tmp_path / "marker"
    malicious(fold / name, marker) if damage == "payload" else damage(fold / name)
    trainer, events = rerun(interrupted, tmp_path)

    result = trainer.run()

    assert result.status == "completed" and result.epochs_run == 2
    warnings = [e for e in events if e["kind"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["note"] == note
    assert warnings[0]["message"].startswith(f"{fold / name} {said}")
    resumed = [e["epoch"] for e in events if e["kind"] == "resumed"]
    if note == "restarted":  # from scratch: nothing of the damaged run is kept
        assert resumed == [] and warnings[0]["message"].endswith("the fold starts again from epoch 0")
    else:  # last.pt was fine: resumed after epoch 1, model.pt rewritten from it
        assert resumed == [1] and "rewritten from last.pt (epoch 1)" in warnings[0]["message"]
    assert pd.read_csv(fold / "history.csv")["epoch"].tolist() == [1, 2]
    assert load_checkpoint(fold / "model.pt")["epoch"] == result.best_epoch
    assert not (fold / "last.pt").exists() and not marker.exists()


def test_an_unusable_model_pt_that_last_pt_cannot_replace_is_a_clear_error(interrupted, tmp_path):
    fold = copy_fold(interrupted, tmp_path)
    truncate(fold / "model.pt")
    trainer, _ = rerun(interrupted, tmp_path)
    with pytest.raises(train.CheckpointMismatch, match=r"epoch 1 as the best, but model\.pt holds nothing usable "
                                                       r"\(it is unreadable \(truncated or corrupt"):
        trainer._repair_best(None, {"epoch": 2, "best_epoch": 1})  # the best weights are in no file


def test_the_warning_reaches_the_user_with_or_without_the_cv_view(interrupted, capsys):
    config, dataset, folds, fold = interrupted
    view = CVProgress([("tcn", 0)], epochs=2)
    view({"arch": "tcn", "fold": 0, "kind": "warning", "note": "restarted", "message": "last.pt is unreadable"})
    assert "tcn fold 0: last.pt is unreadable" in capsys.readouterr().out
    assert view.bars.tasks[0].fields["note"] == "[yellow]restarted[/]"
    alone = train.FoldTrainer(config, "tcn", 0, dataset, folds, fold)  # no progress callback (tuning)
    alone._warn("restarted", "model.pt is unreadable")
    assert "tcn fold 0: model.pt is unreadable" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------
# extract --weights, pretrain --init and pretrain's last.pt
# ---------------------------------------------------------------------------------------------------

def test_extract_refuses_malicious_weights(tiny_root, tmp_path, capsys):
    (tmp_path / "crops").mkdir()
    weights = malicious(tmp_path / "weights.pth", tmp_path / "marker")
    code = extract_main(["visual", "--data-root", str(tiny_root), "--backbone", VISUAL_BACKBONE, "--weights",
                         str(weights), "--frames", str(tmp_path / "crops"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 1 and "weights.pth: cannot load the checkpoint" in out and "could run code" in out
    assert not (tmp_path / "marker").exists()


@pytest.fixture
def images(tmp_path) -> Path:
    """Four small face-sized images: enough for a step of MAE on the tiny ViT."""
    rng = np.random.default_rng(0)
    for i in range(4):
        path = tmp_path / "images" / f"{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(path)
    return tmp_path / "images"


def mae_args(images, out, *more) -> list[str]:
    return ["mae", "--images", str(images), "--backbone", VISUAL_BACKBONE, "--out", str(out), "--batch-size", "2",
            "--workers", "0", "--device", "cpu", "--steps", "2", *more]


def test_pretrain_refuses_a_malicious_init(images, tmp_path, capsys):
    init = malicious(tmp_path / "init.pth", tmp_path / "marker")
    assert pretrain_main(mae_args(images, tmp_path / "out", "--init", str(init))) == 2
    err = capsys.readouterr().err
    assert "init.pth: cannot load the checkpoint" in err and "could run code" in err
    assert not (tmp_path / "marker").exists()


def test_pretrain_init_accepts_safetensors(images, tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    weights = {f"encoder.{k}": v.contiguous() for k, v in
               timm.create_model(VISUAL_BACKBONE, pretrained=False, num_classes=0).state_dict().items()}
    path = tmp_path / "init.safetensors"
    save_file(weights, str(path))
    encoder = timm.create_model(VISUAL_BACKBONE, pretrained=False, num_classes=0)
    load = load_init(encoder, path, VISUAL_BACKBONE)
    assert load.missing == [] and load.unexpected == []
    assert all(torch.equal(v, weights[f"encoder.{k}"]) for k, v in encoder.state_dict().items())
    assert pretrain_main(mae_args(images, tmp_path / "out", "--init", str(path))) == 0


@pytest.mark.parametrize("damage", ["truncated", "malicious"])
def test_a_damaged_pretrain_last_pt_starts_the_stage_over(images, tmp_path, capsys, damage):
    options = MAEOptions(images=[str(images)], backbone=VISUAL_BACKBONE, out=str(tmp_path / "out"), steps=2,
                         batch_size=2, workers=0, device="cpu", save_every=100)
    assert train_mae(MAEOptions(**{**options.__dict__, "max_steps": 1})).step == 1
    last = tmp_path / "out" / "last.pt"
    truncate(last) if damage == "truncated" else malicious(last, tmp_path / "marker")
    capsys.readouterr()
    result = train_mae(options)
    said = "is unreadable (truncated or corrupt" if damage == "truncated" else "is unsafe to load"
    assert f"mae: {last} {said}" in capsys.readouterr().out
    assert result.resumed_from == 0 and result.complete and not (tmp_path / "marker").exists()


def test_a_last_pt_of_an_earlier_version_with_numpy_values_still_loads(tmp_path):
    """Before checkpoints held plain floats, a fold's history held numpy float64s: those resume."""
    import numpy as np

    from abaw.checkpoint import load_checkpoint, numpy_scalars

    path = tmp_path / "last.pt"
    torch.save({"state": {"history": [{"val_ccc": np.float64(0.5), "epoch": np.int64(1)}]}}, path)
    with pytest.raises(UnsafeCheckpoint):
        load_checkpoint(path)
    assert load_checkpoint(path, allow=numpy_scalars())["state"]["history"][0]["val_ccc"] == 0.5
