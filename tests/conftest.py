import os
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a model hub
os.environ.pop("ABAW_STORAGE", None)  # a developer's own study storage never receives the tests' trials

from abaw import demo  # noqa: E402
from abaw.data import LABEL_DIR  # noqa: E402


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """The full built-in demo dataset, generated once per test session."""
    return demo.generate(tmp_path_factory.mktemp("demo") / "root")


SMALL_DEMO = demo.DemoSpec(n_train=12, n_val=4, n_test=3, max_frames=900, mean_extra_frames=300)


@pytest.fixture(scope="session")
def small_root(tmp_path_factory) -> Path:
    """A small demo dataset (19 videos) for tests that train."""
    return demo.generate(tmp_path_factory.mktemp("small") / "root", SMALL_DEMO)


def write_labels(path: Path, rows, header="valence,arousal", newline="\n", trailing=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [header] + [f"{v},{a}" for v, a in rows] if header is not None else [f"{v},{a}" for v, a in rows]
    path.write_bytes((newline.join(lines) + newline + trailing).encode())


@pytest.fixture
def tiny_root(tmp_path) -> Path:
    """A small valid root: 3 train, 1 val, 2 test videos, visual 8-d and audio 3-d features."""
    rng = np.random.default_rng(0)
    root = tmp_path / "aw2"
    videos = {"train": ["a", "b_left", "b_right"], "val": ["c"], "test": ["t1", "t2"]}
    folder = {"train": "Train_Set", "val": "Validation_Set"}
    for split, names in videos.items():
        for name in names:
            n = 20
            if split != "test":
                labels = rng.uniform(-1, 1, size=(n, 2)).round(3)
                labels[3] = -5
                write_labels(root / LABEL_DIR / folder[split] / f"{name}.txt", labels.tolist())
            for modality, dim in (("visual", 8), ("audio", 3)):
                (root / "features" / modality).mkdir(parents=True, exist_ok=True)
                np.save(root / "features" / modality / f"{name}.npy", rng.standard_normal((n, dim)).astype(np.float32))
    (root / "Valence_Arousal_Estimation_Challenge_test_set_release.txt").write_text("t1\nt2\n")
    sample = ["image_location,valence,arousal"] + [f"{v}/{i:05d}.jpg,," for v in ("t1", "t2") for i in range(1, 21)]
    (root / "CVPR_8th_ABAW_VA_test_set_sample.txt").write_text("\n".join(sample) + "\n")
    return root


SHAPE_CSV = Path(__file__).resolve().parents[1] / "abaw" / "resources" / "affwild2_shape.csv"


def release_shaped_root(root: Path, frames_per: int = 200, seed: int = 0) -> Path:
    """A root with every video of the real release: its names, splits and face shares (NaN rows).

    Lengths are the real ones divided by ``frames_per`` (at least 4 frames), labels are noise: the
    shape of the release, not its content. One 4-d ``visual`` modality; the sample lists every test frame.
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    shape = pd.read_csv(SHAPE_CSV, dtype={"video": str})
    (root / "features" / "visual").mkdir(parents=True)
    sample = ["image_location,valence,arousal"]
    for row in shape.itertuples():
        n = max(4, row.frames // frames_per)
        features = rng.standard_normal((n, 4)).astype(np.float32)
        features[rng.random(n) > row.face_share] = np.nan
        np.save(root / "features" / "visual" / f"{row.video}.npy", features)
        if row.split == "test":
            sample += [f"{row.video}/{i:05d}.jpg,," for i in range(1, n + 1)]
        else:
            folder = {"train": "Train_Set", "val": "Validation_Set"}[row.split]
            write_labels(root / LABEL_DIR / folder / f"{row.video}.txt", rng.uniform(-1, 1, (n, 2)).round(3).tolist())
    test = shape[shape.split == "test"].video
    (root / "Valence_Arousal_Estimation_Challenge_test_set_release.txt").write_text("\n".join(test) + "\n")
    (root / "CVPR_8th_ABAW_VA_test_set_sample.txt").write_text("\n".join(sample) + "\n")
    return root


@pytest.fixture(scope="session")
def release_root(tmp_path_factory) -> Path:
    """Every video of the real release, in miniature (see :func:`release_shaped_root`)."""
    return release_shaped_root(tmp_path_factory.mktemp("release") / "root")


@pytest.fixture(scope="session")
def raw_root(tmp_path_factory) -> Path:
    """The raw demo release (abaw/raw_demo.py, default spec), generated once per test session.

    Shared: a test that writes into it (features/) works on a copy."""
    from abaw import raw_demo

    return raw_demo.generate_raw(tmp_path_factory.mktemp("raw") / "root")


def make_videos(folder: Path, dims: dict[str, int] | None = None, lengths=(120, 90, 150, 60, 200, 80, 110, 70),
                seed: int = 0, split: str = "train", noise=0.5):
    """Labelled ``VideoRecord``s over .npy features written to ``folder`` (for models fitted on videos).

    Video i belongs to subject ``s{i // 2}``. Each has a smooth latent (T, 2) that its labels follow
    (tanh) and its features show through a fixed random mixing plus noise (``noise``: its standard
    deviation, one or one per column); a stretch of NaN rows (no face) and a stretch of -5 labels.
    """
    from abaw.data import VideoRecord

    dims = dims or {"visual": 8}
    rng = np.random.default_rng(seed)
    mixing = {m: rng.standard_normal((2, d)) for m, d in dims.items()}
    videos = []
    for i, n in enumerate(lengths):
        steps = rng.standard_normal((n, 2))
        latent = np.cumsum(steps, axis=0) / np.sqrt(n) + rng.standard_normal(2) * 0.3
        labels = np.tanh(latent).astype(np.float32)
        labels[n // 5:n // 5 + 5] = -5
        paths = {}
        for m, d in dims.items():
            feats = (latent @ mixing[m] + noise * rng.standard_normal((n, d))).astype(np.float32)
            feats[n // 2:n // 2 + n // 6] = np.nan
            paths[m] = folder / m / f"v{i}.npy"
            paths[m].parent.mkdir(parents=True, exist_ok=True)
            np.save(paths[m], feats)
        videos.append(VideoRecord(f"v{i}", f"s{i // 2}", split, n, labels, paths))
    return videos
