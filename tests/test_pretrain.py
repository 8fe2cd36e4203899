"""abaw.pretrain: MAE pretraining and expression fine-tuning of the tiny test ViT, on the raw demo's faces.

Small and fast: a few dozen steps on one thread (two threads fight each other on a busy 2-core box)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from abaw.extract.visual import create_backbone, load_weights
from abaw.pretrain.__main__ import main
from abaw.pretrain.common import PretrainError
from abaw.pretrain.expr import (EXPR_DIR, ExprOptions, class_weights, expr_frames, finetune_expr, layer_id,
                                lrd_param_groups, macro_f1, parse_expr_file)
from abaw.pretrain.mae import MAEOptions, build_mae, decoder_size, train_mae
from abaw.stand_ins import VISUAL_BACKBONE

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def faces(raw_root, tmp_path_factory) -> Path:
    """48 face crops from 6 videos, nested a level deep (the search is recursive)."""
    out = tmp_path_factory.mktemp("faces")
    for video in sorted((raw_root / "cropped_aligned").iterdir())[:6]:
        (out / "nested" / video.name).mkdir(parents=True)
        for image in sorted(video.glob("*.jpg"))[::20][:8]:
            shutil.copy(image, out / "nested" / video.name / image.name)
    return out


def mae_options(faces, out, **kw) -> MAEOptions:
    base = dict(images=[str(faces)], backbone=VISUAL_BACKBONE, out=str(out), steps=30, batch_size=8, lr=2e-3,
                warmup_steps=3, workers=0, device="cpu", preview_every=15, save_every=10)
    return MAEOptions(**{**base, **kw})


def assert_loads_into_extract(path: Path) -> None:
    """The file loads into abaw.extract visual's backbone with every tensor used and none missing."""
    model = create_backbone(VISUAL_BACKBONE)
    load = load_weights(model, path, VISUAL_BACKBONE)
    assert load.missing == [] and load.unexpected == []
    assert load.loaded == len(model.state_dict())
    saved = torch.load(path, weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def mae_run(faces, tmp_path_factory):
    out = tmp_path_factory.mktemp("mae")
    return train_mae(mae_options(faces, out)), out


def test_decoder_follows_the_paper_and_scales_down():
    assert decoder_size(768, 12) == (8, 512, 16)  # ViT-B: the paper's decoder
    assert decoder_size(1024, 24) == (8, 512, 16)  # ViT-L keeps it
    assert decoder_size(384, 12) == (8, 256, 8)  # ViT-S: half the width
    assert decoder_size(64, 6) == (4, 32, 1)  # test_vit


def test_masking_hides_three_quarters_per_sample_and_patchify_round_trips():
    torch.manual_seed(0)
    model = build_mae(create_backbone(VISUAL_BACKBONE).requires_grad_(True))
    x = torch.randn(3, 3, 160, 160)
    assert torch.equal(model.unpatchify(model.patchify(x)), x)
    loss, prediction, mask = model(x)
    assert prediction.shape == (3, 100, 16 * 16 * 3)
    assert mask.sum(dim=1).tolist() == [75, 75, 75]
    assert not torch.equal(mask[0], mask[1])  # a shuffle of its own per sample
    loss.backward()
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None


def test_mae_loss_falls_and_the_encoder_loads_into_extract(mae_run):
    result, out = mae_run
    assert result.complete and result.step == 30
    assert np.mean(result.losses[-5:]) < 0.9 * np.mean(result.losses[:5])
    assert (out / "previews" / "step_0000015.png").stat().st_size > 1000
    assert (out / "history.csv").read_text().count("\n") == 31
    assert_loads_into_extract(out / "encoder.pth")


def test_mae_kill_and_rerun_equals_the_unbroken_run(faces, tmp_path):
    whole = train_mae(mae_options(faces, tmp_path / "whole", steps=6, batch_size=4, save_every=100))
    first = train_mae(mae_options(faces, tmp_path / "broken", steps=6, batch_size=4, save_every=100, max_steps=4))
    assert first.step == 4 and not first.complete
    rest = train_mae(mae_options(faces, tmp_path / "broken", steps=6, batch_size=4, save_every=100))
    assert rest.resumed_from == 4 and rest.complete and len(rest.losses) == 2
    assert first.losses + rest.losses == pytest.approx(whole.losses, rel=1e-5)
    a = torch.load(tmp_path / "whole" / "encoder.pth", weights_only=True)
    b = torch.load(tmp_path / "broken" / "encoder.pth", weights_only=True)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    with pytest.raises(PretrainError, match="other settings"):  # a rerun must ask for the same run
        train_mae(mae_options(faces, tmp_path / "broken", steps=6, batch_size=2))


def test_mae_errors_name_the_folder(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "notes.txt").write_text("no images\n")
    assert main(["mae", "--images", str(tmp_path / "empty"), "--backbone", VISUAL_BACKBONE, "--out",
                 str(tmp_path / "out")]) == 2
    assert f"{tmp_path / 'empty'}: no .jpg/.jpeg/.png images" in capsys.readouterr().err
    assert main(["mae", "--images", str(tmp_path / "none"), "--backbone", VISUAL_BACKBONE, "--out",
                 str(tmp_path / "out")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_raw_demo_expression_labels(raw_root):
    for split in ("Train_Set", "Validation_Set"):
        files = sorted((raw_root / EXPR_DIR / split).glob("*.txt"))
        assert files and [f.name for f in files] == sorted(
            f.name for f in (raw_root / "VA_Estimation_Challenge" / split).glob("*.txt"))
        labels = np.concatenate([parse_expr_file(f) for f in files])
        counts = np.bincount(labels + 1, minlength=9)
        assert counts[0] > 0 and (counts[1:] > 0).all()  # some unlabelled frames, every class present


def test_expression_files_errors_name_file_and_line(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other\n0\n-1\n7\n")
    assert parse_expr_file(path).tolist() == [0, -1, 7]
    path.write_text("Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other\n0\nx\n")
    with pytest.raises(PretrainError, match=f"{path}:3: "):
        parse_expr_file(path)
    path.write_text("Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other\n0\n1\n8\n")
    with pytest.raises(PretrainError, match=f"{path}:4: class index 8"):
        parse_expr_file(path)
    path.write_text("valence,arousal\n0\n")
    with pytest.raises(PretrainError, match=f"{path}:1: expected the header"):
        parse_expr_file(path)


def test_frames_without_an_image_are_skipped(tmp_path):
    root = tmp_path / "root"
    for split in ("Train_Set", "Validation_Set"):
        (root / EXPR_DIR / split).mkdir(parents=True)
    (root / EXPR_DIR / "Train_Set" / "a.txt").write_text(
        "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other\n3\n-1\n5\n6\n")
    (root / "cropped_aligned" / "a").mkdir(parents=True)
    for frame in (1, 2, 4):  # frame 3 has no image, frame 2 no label
        (root / "cropped_aligned" / "a" / f"{frame:05d}.jpg").write_bytes(b"")
    paths, labels = expr_frames(root, "train", root / "cropped_aligned")
    assert [p.name for p in paths] == ["00001.jpg", "00004.jpg"] and labels.tolist() == [3, 6]


def test_macro_f1_weights_and_layer_decay():
    truth = np.array([0, 0, 1, 1])
    assert macro_f1(truth, truth, n_classes=2) == 1.0
    assert macro_f1(truth, np.zeros(4, int), n_classes=2) == pytest.approx((2 / 3) / 2)
    weights = class_weights(np.array([0, 0, 0, 1]), n_classes=3)
    assert weights[1] == pytest.approx(3 * weights[0]) and weights[2] == 0 and weights[:2].mean() == pytest.approx(1)
    encoder = create_backbone(VISUAL_BACKBONE).requires_grad_(True)
    assert layer_id("pos_embed", 6) == 0 and layer_id("blocks.5.mlp.fc1.weight", 6) == 6 and layer_id("norm.weight", 6) == 7
    groups = lrd_param_groups(encoder, torch.nn.Linear(64, 8), 1.0, 0.05, 0.5)
    rates = {g["layer"]: g["lr"] for g in groups}
    assert rates[7] == 1.0 and rates[6] == 0.5 and rates[0] == pytest.approx(0.5 ** 7)


def test_expression_fine_tuning_beats_a_constant_and_exports_the_encoder(raw_root, mae_run, tmp_path):
    _, mae_out = mae_run
    options = ExprOptions(data_root=str(raw_root), out=str(tmp_path / "expr"), init=str(mae_out / "encoder.pth"),
                          backbone=VISUAL_BACKBONE, epochs=4, batch_size=32, frame_step=4, lr=1e-2,
                          label_smoothing=0.0, warmup_epochs=0.5, workers=0, device="cpu")
    first = finetune_expr(ExprOptions(**{**options.__dict__, "max_epochs": 1}))
    assert first.epoch == 1 and not first.complete
    result = finetune_expr(options)  # resumes after epoch 1
    assert result.complete and [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert result.best_f1 > result.constant_f1  # better than always the most frequent class
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert_loads_into_extract(tmp_path / "expr" / "encoder.pth")
    best = torch.load(tmp_path / "expr" / "best.pt", weights_only=True)
    saved = torch.load(tmp_path / "expr" / "encoder.pth", weights_only=True)
    assert not any(k.startswith("head") for k in saved)
    assert all(torch.equal(saved[k], best["encoder"][k]) for k in saved)
