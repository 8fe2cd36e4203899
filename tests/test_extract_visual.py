"""``abaw.extract.visual``: face crops -> per-frame backbone features, aligned by frame number.

Every model is one of timm's tiny test models (``test_vit``: 160 px, class token, 64-d; ``test_vit2``:
a register token but no class token, fc_norm pooling; ``test_resnet``: bilinear, no tokens) with
random weights saved to a temporary file. Expected features are computed here independently: the
model loaded strictly with the same weights, timm's own eval transform with ``crop_pct=1`` (a plain
resize of the square crop), and the pool written out.
"""
import argparse
import functools

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from abaw.extract.__main__ import main
from abaw.extract.frames import ExtractError
from abaw.extract.visual import extract_visual, load_weights

VIDEOS = ["a", "b_left", "b_right", "c", "t1", "t2"]  # tiny_root's videos, 20 frames each
FAST = dict(batch_size=7, workers=0, device="cpu", dtype="float32")  # 7: batches span videos


def write_crop(path, seed, size=112):
    """A distinct 112x112 JPEG: a random smooth pattern plus noise (so that every frame's features differ)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y + rng.uniform()))
                     for _ in range(3)], axis=-1)
    pixels = np.clip(127 + 100 * base + rng.normal(0, 10, base.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def write_crops(crops, video, frames):
    return {f: write_crop(crops / video / f"{f:05d}.jpg", seed=hash((video, f)) % 2**32) for f in frames}


def random_state(backbone, seed):
    torch.manual_seed(seed)
    return timm.create_model(backbone, pretrained=False, num_classes=0).state_dict()


@pytest.fixture
def vit_weights(tmp_path):
    path = tmp_path / "test_vit.pth"
    torch.save(random_state("test_vit", seed=1), path)
    return path


@functools.lru_cache(maxsize=4)
def reference_model(backbone, weights):
    """The backbone with the weights loaded strictly (every tensor), and timm's eval transform."""
    model = timm.create_model(backbone, pretrained=False, num_classes=0).eval()
    model.load_state_dict(torch.load(weights, weights_only=True))
    config = timm.data.resolve_model_data_config(model)
    return model, timm.data.create_transform(**{**config, "crop_pct": 1.0})  # no crop: the whole face


def reference(backbone, weights, image_path, pool):
    """The feature of one image, computed without the module under test."""
    model, transform = reference_model(backbone, weights)
    x = transform(Image.open(image_path).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        if pool == "avg":
            return model(x)[0].numpy()
        tokens = model.forward_features(x)
        pooled = tokens[0, 0] if pool == "cls" else tokens[0, model.num_prefix_tokens:].mean(0)
        if backbone == "test_vit2":  # norms after pooling (norm=Identity, fc_norm=LayerNorm), as BEiT and EVA
            pooled = model.fc_norm(pooled)
        return pooled.numpy()


def names(videos):
    """Video names, whether given as names or as Targets."""
    return sorted(getattr(v, "video", v) for v in videos)


def features(root, name, video):
    return np.load(root / "features" / name / f"{video}.npy")


# ---------------------------------------------------------------------------------------------------
# alignment
# ---------------------------------------------------------------------------------------------------

def test_rows_follow_frame_numbers_not_listing_positions(tiny_root, vit_weights):
    crops = tiny_root / "cropped_aligned"
    a = write_crops(crops, "a", [f for f in range(1, 21) if f not in (3, 7)] + [25])  # 25: past the end
    b = write_crops(crops, "b_left", [1, 2, 4])  # a listing's position 3 is frame 4
    t1 = write_crops(crops, "t1", range(1, 21))

    report = extract_visual(tiny_root, "test_vit", vit_weights, name="vit", **FAST)

    assert sorted(report.written) == VIDEOS
    assert sorted(report.no_crops) == ["b_right", "c", "t2"]
    for video in ("b_right", "c", "t2"):
        assert np.isnan(features(tiny_root, "vit", video)).all()
    assert report.missing == 2 + 17 + 3 * 20  # a: frames 3, 7; b_left: all but 3 frames; 3 empty videos
    assert report.frames == 6 * 20 and report.unreadable == []

    rows_a = features(tiny_root, "vit", "a")
    assert rows_a.shape == (20, 64)
    assert np.isnan(rows_a).any(axis=1).nonzero()[0].tolist() == [2, 6]
    for frame in (1, 2, 4, 8, 20):
        np.testing.assert_allclose(rows_a[frame - 1], reference("test_vit", vit_weights, a[frame], "cls"), atol=1e-4)

    rows_b = features(tiny_root, "vit", "b_left")
    assert (~np.isnan(rows_b).any(axis=1)).nonzero()[0].tolist() == [0, 1, 3]
    expected = {f: reference("test_vit", vit_weights, b[f], "cls") for f in (1, 2, 4)}
    assert not np.allclose(expected[2], expected[4], atol=1e-3)  # distinct images, so row 3 can tell them apart
    for frame, value in expected.items():
        np.testing.assert_allclose(rows_b[frame - 1], value, atol=1e-4)
    np.testing.assert_allclose(features(tiny_root, "vit", "t1")[19], reference("test_vit", vit_weights, t1[20], "cls"),
                               atol=1e-4)


def test_resume_skips_finished_videos_and_remakes_a_deleted_one(tiny_root, vit_weights):
    crops = tiny_root / "cropped_aligned"
    for video in ("a", "t1"):
        write_crops(crops, video, range(1, 21))
    first = extract_visual(tiny_root, "test_vit", vit_weights, name="vit", **FAST)
    assert sorted(first.written) == VIDEOS
    folder = tiny_root / "features" / "vit"
    mtimes = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npy")}
    before = features(tiny_root, "vit", "a")

    second = extract_visual(tiny_root, "test_vit", vit_weights, name="vit", **FAST)
    assert second.written == [] and names(second.skipped) == VIDEOS and second.frames == 0
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npy")} == mtimes

    (folder / "a.npy").unlink()
    third = extract_visual(tiny_root, "test_vit", vit_weights, name="vit", **FAST)
    assert third.written == ["a"] and len(third.skipped) == 5
    np.testing.assert_allclose(features(tiny_root, "vit", "a"), before, atol=1e-6)
    assert (folder / "t1.npy").stat().st_mtime_ns == mtimes["t1.npy"]


def test_unreadable_images_are_named_counted_and_nan(tiny_root, vit_weights):
    crops = tiny_root / "cropped_aligned"
    images = write_crops(crops, "a", range(1, 21))
    images[5].write_bytes(b"this is not a JPEG")
    whole = images[6].read_bytes()
    images[6].write_bytes(whole[: len(whole) // 2])  # truncated mid-scan

    report = extract_visual(tiny_root, "test_vit", vit_weights, name="vit", **FAST)

    assert len(report.unreadable) == 2
    assert str(images[5]) in report.unreadable[0] and str(images[6]) in report.unreadable[1]
    rows = features(tiny_root, "vit", "a")
    assert np.isnan(rows).any(axis=1).nonzero()[0].tolist() == [4, 5]
    np.testing.assert_allclose(rows[6], reference("test_vit", vit_weights, images[7], "cls"), atol=1e-4)
    assert report.missing == 2 + 5 * 20


def test_missing_frames_folder_and_missing_weights_are_clear_errors(tiny_root, vit_weights, tmp_path):
    with pytest.raises(ExtractError, match=r"nowhere.*does not exist"):
        extract_visual(tiny_root, "test_vit", vit_weights, frames_dir=tmp_path / "nowhere", **FAST)
    with pytest.raises(ExtractError, match=r"cropped_aligned.*does not exist"):  # the default folder, absent
        extract_visual(tiny_root, "test_vit", vit_weights, **FAST)
    (tiny_root / "cropped_aligned").mkdir()
    with pytest.raises(ExtractError, match=r"absent\.pth: --weights checkpoint not found"):
        extract_visual(tiny_root, "test_vit", tmp_path / "absent.pth", **FAST)
    with pytest.raises(ExtractError, match="not a timm model"):
        extract_visual(tiny_root, "no_such_backbone", vit_weights, **FAST)
    assert not (tiny_root / "features" / "vit").exists()


# ---------------------------------------------------------------------------------------------------
# pools
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone, pool, width", [("test_vit", "cls", 64), ("test_vit", "mean", 64),
                                                   ("test_vit2", "mean", 64), ("test_vit", "avg", 64),
                                                   ("test_vit2", "avg", 64), ("test_resnet", "avg", 96)])
def test_pools_match_the_model(tiny_root, tmp_path, backbone, pool, width):
    weights = tmp_path / f"{backbone}.pth"
    torch.save(random_state(backbone, seed=2), weights)
    images = write_crops(tiny_root / "cropped_aligned", "c", [1, 9])
    extract_visual(tiny_root, backbone, weights, pool=pool, name="out", **FAST)
    rows = features(tiny_root, "out", "c")
    assert rows.shape == (20, width)
    for frame, image in images.items():
        np.testing.assert_allclose(rows[frame - 1], reference(backbone, weights, image, pool), atol=1e-4)


def test_pools_differ_where_they_should(tiny_root, vit_weights):
    """cls, mean and avg are three different vectors of test_vit; mean leaves out the class token."""
    image = write_crops(tiny_root / "cropped_aligned", "c", [1])[1]
    rows = {}
    for pool in ("cls", "mean"):
        extract_visual(tiny_root, "test_vit", vit_weights, pool=pool, name=pool, **FAST)
        rows[pool] = features(tiny_root, pool, "c")[0]
    assert not np.allclose(rows["cls"], rows["mean"], atol=1e-3)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    model.load_state_dict(torch.load(vit_weights, weights_only=True))
    x = timm.data.create_transform(**{**timm.data.resolve_model_data_config(model), "crop_pct": 1.0})(
        Image.open(image).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        with_class_token = model.forward_features(x)[0].mean(0).numpy()
    assert not np.allclose(rows["mean"], with_class_token, atol=1e-3)


@pytest.mark.parametrize("backbone, pool, message", [
    ("test_resnet", "cls", r"test_resnet gives a feature map .*use --pool avg"),
    ("test_resnet", "mean", r"test_resnet gives a feature map .*use --pool avg"),
    ("test_efficientnet", "cls", r"test_efficientnet gives a feature map .*use --pool avg"),
    ("test_vit2", "cls", r"--pool cls: test_vit2 has no class token: use --pool avg"),
])
def test_pool_that_does_not_fit_is_a_clear_error(tiny_root, tmp_path, backbone, pool, message):
    weights = tmp_path / "w.pth"
    torch.save(random_state(backbone, seed=0), weights)
    (tiny_root / "cropped_aligned").mkdir()
    with pytest.raises(ExtractError, match=message):
        extract_visual(tiny_root, backbone, weights, pool=pool, name="out", **FAST)
    assert not (tiny_root / "features" / "out").exists()


# ---------------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------------

def _prefixed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


@pytest.mark.parametrize("layout, filename", [
    (lambda s: s, "plain.pth"),
    (lambda s: _prefixed(s, "module."), "ddp.pt"),
    (lambda s: {"state_dict": _prefixed(s, "model.")}, "lightning.ckpt"),
    (lambda s: {"model": _prefixed(s, "encoder."), "epoch": 3, "args": argparse.Namespace(lr=1e-3)}, "pretrain.pth"),
    (lambda s: {"model": _prefixed(s, "module.encoder.")}, "nested.pth"),
    (lambda s: _prefixed(s, "model."), "hf.safetensors"),
    (lambda s: s, "pytorch_model.bin"),
])
def test_weights_load_through_prefixes_and_nesting(tmp_path, capsys, layout, filename):
    source = random_state("test_vit", seed=3)
    path = tmp_path / filename
    content = layout({k: v.clone() for k, v in source.items()})
    if filename.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(content, str(path))
    else:
        torch.save(content, path)
    torch.manual_seed(4)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0)
    load = load_weights(model, path, "test_vit")
    assert load.loaded == len(source) and load.missing == [] and load.unexpected == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, source[key]), key
    assert f"{len(source)} of {len(source)} tensors of test_vit loaded from {path}" in capsys.readouterr().out


def test_missing_and_unexpected_keys_are_reported(tmp_path, capsys):
    source = random_state("test_vit", seed=3)
    state = {k: v for k, v in source.items() if k != "norm.weight"}
    state["decoder.pred.weight"] = torch.zeros(3, 3)
    state["head.weight"] = torch.zeros(10, 64)
    path = tmp_path / "partial.pth"
    torch.save({"model": _prefixed(state, "encoder.")}, path)
    torch.manual_seed(4)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0)
    random_norm = model.state_dict()["norm.weight"].clone()

    load = load_weights(model, path, "test_vit")

    assert load.missing == ["norm.weight"]
    assert sorted(load.unexpected) == ["encoder.decoder.pred.weight", "encoder.head.weight"]
    assert torch.equal(model.state_dict()["norm.weight"], random_norm)  # kept random, as reported
    assert torch.equal(model.state_dict()["cls_token"], source["cls_token"])
    out = capsys.readouterr().out
    assert "1 missing from the checkpoint (kept random): norm.weight" in out
    assert "2 unexpected" in out and "encoder.decoder.pred.weight" in out and "encoder.head.weight" in out


def test_checkpoints_that_do_not_fit_are_refused(tmp_path):
    model = timm.create_model("test_vit", pretrained=False, num_classes=0)
    other = tmp_path / "resnet.pth"
    torch.save({"state_dict": random_state("test_resnet", seed=0)}, other)
    with pytest.raises(ExtractError, match=r"resnet\.pth: none of its \d+ tensors is a parameter of test_vit"):
        load_weights(model, other, "test_vit")

    wider = tmp_path / "vit3.pth"  # same names, another width
    torch.save(random_state("test_vit3", seed=0), wider)
    with pytest.raises(ExtractError, match=r"vit3\.pth: \d+ tensor\(s\) have another shape than in test_vit"):
        load_weights(model, wider, "test_vit")

    not_tensors = tmp_path / "list.pth"
    torch.save({"model": {"epoch": 3}}, not_tensors)
    with pytest.raises(ExtractError, match=r"list\.pth: no tensors found"):
        load_weights(model, not_tensors, "test_vit")


class Arbitrary:  # a pickled object of this class would run code on loading: weights_only refuses it
    pass


def test_a_checkpoint_needing_unsafe_loading_is_refused_by_name(tmp_path):
    path = tmp_path / "unsafe.pth"
    torch.save({"model": random_state("test_vit", seed=0), "extra": Arbitrary()}, path)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0)
    with pytest.raises(ExtractError, match=r"unsafe\.pth: cannot load the checkpoint with torch\.load\(weights_only"
                                           r"=True\):.*Arbitrary"):
        load_weights(model, path, "test_vit")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"garbage")
    with pytest.raises(ExtractError, match=r"broken\.safetensors: cannot read the safetensors checkpoint"):
        load_weights(model, broken, "test_vit")


# ---------------------------------------------------------------------------------------------------
# the command line, end to end
# ---------------------------------------------------------------------------------------------------

def test_cli_writes_every_video_and_passes_the_check(tiny_root, vit_weights, tmp_path, capsys):
    frames = tmp_path / "my_crops"  # --frames: another folder than ROOT/cropped_aligned
    written = {video: write_crops(frames, video, range(1, 21, 2)) for video in ("a", "b_left", "b_right", "t2")}
    args = ["visual", "--data-root", str(tiny_root), "--backbone", "test_vit", "--weights", str(vit_weights),
            "--frames", str(frames), "--name", "vit", "--batch-size", "16", "--device", "cpu"]  # 2 workers

    assert main(args) == 0

    out = capsys.readouterr().out
    assert "6 video(s) written" in out
    for video in VIDEOS:
        rows = features(tiny_root, "vit", video)
        assert rows.shape == (20, 64) and rows.dtype == np.float16
        present = ~np.isnan(rows).any(axis=1)
        assert present.nonzero()[0].tolist() == ([f - 1 for f in written[video]] if video in written else [])
    np.testing.assert_allclose(features(tiny_root, "vit", "t2")[18],
                               reference("test_vit", vit_weights, written["t2"][19], "cls"), atol=2e-2, rtol=1e-2)

    assert main([*args[:-4], "--device", "cpu"]) == 0  # a rerun: everything skipped, the check passes again
    assert "6 video(s) already extracted" in capsys.readouterr().out


def test_cli_reports_a_bad_frames_folder(tiny_root, vit_weights, tmp_path, capsys):
    code = main(["visual", "--data-root", str(tiny_root), "--backbone", "test_vit", "--weights", str(vit_weights),
                 "--frames", str(tmp_path / "missing_crops")])
    assert code == 1
    assert "missing_crops" in capsys.readouterr().out
