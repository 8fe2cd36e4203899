"""The built-in demo dataset: complete, deterministic, and learnable only with temporal context."""
import hashlib

import numpy as np
import pytest
from scipy.ndimage import uniform_filter1d
from sklearn.linear_model import Ridge

from abaw import demo
from abaw.data import open_dataset
from abaw.metrics import score


def test_demo_is_valid_and_shaped_like_aff_wild2(demo_root):
    dataset = open_dataset(demo_root)
    counts = {row["split"]: row["videos"] for row in dataset.summary()}
    assert counts == {"train": 40, "val": 12, "test": 12}
    assert dataset.modalities == demo.MODALITY_DIMS
    lengths = [v.n_frames for v in dataset.videos.values()]
    assert 300 <= min(lengths) and max(lengths) <= 3000
    assert sum(name.endswith("_left") for name in dataset.videos) >= 3
    assert any(not v.label_mask.all() for v in dataset.split("train"))
    assert any(not v.features("visual")[1].all() for v in dataset.split("train"))
    truth = demo.load_ground_truth(demo_root)
    assert set(truth) == {v.name for v in dataset.split("test")}
    assert all(len(truth[v.name]) == v.n_frames for v in dataset.split("test"))
    assert len(dataset.sample.image_locations) == sum(v.n_frames for v in dataset.split("test"))


def test_demo_is_deterministic(tmp_path):
    spec = demo.DemoSpec(n_train=6, n_val=2, n_test=3, max_frames=600)

    def digest(root):
        h = hashlib.sha256()
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
        return h.hexdigest()

    assert digest(demo.generate(tmp_path / "a", spec)) == digest(demo.generate(tmp_path / "b", spec))
    assert digest(demo.generate(tmp_path / "c", demo.DemoSpec(n_train=6, n_val=2, n_test=3, max_frames=600,
                                                               seed=1))) != digest(tmp_path / "a")


def test_ensure_demo_reuses_the_cache(tmp_path):
    spec = demo.DemoSpec(n_train=6, n_val=2, n_test=3, max_frames=400)
    root = demo.ensure_demo(tmp_path / "cache", spec)
    stamp = (root / ".complete").stat().st_mtime_ns
    assert demo.ensure_demo(tmp_path / "cache", spec) == root
    assert (root / ".complete").stat().st_mtime_ns == stamp


def _ridge_score(dataset, smooth: int) -> float:
    def xy(split):
        xs, ys = [], []
        for v in dataset.split(split):
            x = v.features("visual")[0]
            if smooth > 1:  # a crude temporal model: average the features over `smooth` frames
                x = uniform_filter1d(x, smooth, axis=0, mode="nearest")
            xs.append(x[v.label_mask])
            ys.append(v.labels[v.label_mask])
        return np.concatenate(xs), np.concatenate(ys)

    x_train, y_train = xy("train")
    x_val, y_val = xy("val")
    return score(Ridge(alpha=10).fit(x_train, y_train).predict(x_val), y_val)["mean"]


def test_labels_need_temporal_context(demo_root):
    dataset = open_dataset(demo_root)
    per_frame = _ridge_score(dataset, smooth=1)
    temporal = _ridge_score(dataset, smooth=31)
    assert per_frame < 0.35
    assert temporal > per_frame + 0.25
