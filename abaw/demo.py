"""A deterministic, Aff-Wild2-shaped demo dataset that stands in for the licensed original.

The labels are learnable only with temporal context:

* a smooth latent "expressed emotion" f(t) per video (valence, arousal), made by low-pass
  filtering white noise twice, so it drifts over ~100 frames;
* annotators react late: the label is y(t) = f(t - lag) with a lag of ``LAG`` frames;
* the face shows f(t) plus strong white "expression jitter" e(t) at every frame, so no per-frame
  model can see through it, while averaging over a few dozen frames can;
* features are a nonlinear, subject-dependent mapping of that noisy latent, plus sensor noise.

So a per-frame linear model is capped well below a temporal model (tested in tests/test_demo.py).
Audio sees arousal only and text sees slow segment means of valence, so fusion models have
something to gain. The test labels go to ``test_ground_truth.csv`` (submission format) so that
tests can score a submission.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.signal import lfilter

from .data import INVALID_LABEL, LABEL_DIR, SPLIT_DIRS
from .io import fsync_dir

VERSION = 1
LAG = 12  # frames between the face showing an emotion and the annotation following it
MODALITY_DIMS = {"visual": 768, "audio": 40, "text": 64}
TEST_LIST_NAME = "Valence_Arousal_Estimation_Challenge_test_set_release.txt"
TEST_SAMPLE_NAME = "CVPR_8th_ABAW_VA_test_set_sample.txt"
GROUND_TRUTH_NAME = "test_ground_truth.csv"


@dataclass(frozen=True)
class DemoSpec:
    n_train: int = 40  # videos, counting each _left/_right file as one
    n_val: int = 12
    n_test: int = 12
    min_frames: int = 300
    max_frames: int = 3000
    mean_extra_frames: int = 700  # lengths are min_frames + Gamma, capped; mean about 1000 frames
    seed: int = 0


def default_root() -> Path:
    """Where the demo lives: $ABAW_DEMO_ROOT, else the user's cache folder."""
    if os.environ.get("ABAW_DEMO_ROOT"):
        return Path(os.environ["ABAW_DEMO_ROOT"])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "abaw" / f"demo-v{VERSION}"


def ensure_demo(root: str | Path | None = None, spec: DemoSpec = DemoSpec()) -> Path:
    """Generate the demo dataset into ``root`` on first use; reuse it afterwards."""
    root = Path(root) if root is not None else default_root()
    if not (root / ".complete").exists():
        generate(root, spec)
    return root


def _smooth(rng: np.random.Generator, n: int, tau: float) -> np.ndarray:
    """Unit-variance low-pass noise: white noise through two one-pole filters of time constant tau."""
    warmup = int(6 * tau)  # discarded, so the filter state has forgotten its zero start
    x = rng.standard_normal(n + warmup)
    alpha = 1.0 / tau
    for _ in range(2):
        x = lfilter([alpha], [1.0, alpha - 1.0], x)  # y[i] = y[i-1] + alpha (x[i] - y[i-1])
    x = x[warmup:]
    return (x - x.mean()) / (x.std() + 1e-8)


def _stretches(rng, n: int, count: int, lo: int, hi: int) -> np.ndarray:
    """Boolean (n,) mask of ``count`` random stretches of length lo..hi."""
    mask = np.zeros(n, bool)
    for _ in range(count):
        length = int(rng.integers(lo, hi))
        start = int(rng.integers(0, max(1, n - length)))
        mask[start:start + length] = True
    return mask


class _World:
    """The fixed random mappings from latent emotion to features, shared by all videos."""

    def __init__(self, rng: np.random.Generator):
        self.visual_w = rng.standard_normal((7, MODALITY_DIMS["visual"])) / np.sqrt(2)
        self.visual_subject_w = rng.standard_normal((6, MODALITY_DIMS["visual"])) / np.sqrt(6)
        self.audio_w = rng.standard_normal((3, MODALITY_DIMS["audio"]))
        self.text_w = rng.standard_normal((2, MODALITY_DIMS["text"]))

    @staticmethod
    def _basis(o: np.ndarray) -> np.ndarray:
        v, a = o[:, 0], o[:, 1]
        return np.stack([v, a, v * v, a * a, v * a, np.sin(np.pi * v), np.cos(np.pi * a)], axis=1)

    def video(self, rng, n: int, subject_embedding: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Labels (n, 2) and features of one video."""
        face = np.stack([_smooth(rng, n + LAG, 40.0), _smooth(rng, n + LAG, 60.0)], axis=1)
        face = 0.85 * np.tanh(0.55 * face + rng.normal(0, 0.15, size=2))  # per-video mood offset
        labels = face[:n].copy()  # y(t) = f(t - LAG): frame t of the labels sees face frame t - LAG
        face = face[LAG:]

        shown = face + rng.normal(0, 1.0, size=face.shape)  # per-frame jitter: only time averages see f
        visual = np.tanh(self._basis(shown) @ self.visual_w + subject_embedding @ self.visual_subject_w)
        visual += rng.normal(0, 0.3, size=visual.shape)
        no_face = _stretches(rng, n, int(rng.integers(0, 3)), 20, 150)
        visual[no_face] = np.nan

        heard = face[:, 1:2] + rng.normal(0, 0.8, size=(n, 1))
        audio = np.concatenate([heard, heard ** 2, np.sin(2 * heard)], axis=1) @ self.audio_w
        audio += rng.normal(0, 0.5, size=audio.shape)

        segment = np.repeat(np.arange(n // 150 + 1), 150)[:n]
        segment_valence = np.array([face[segment == s, 0].mean() for s in np.unique(segment)])[segment]
        said = np.stack([segment_valence, np.abs(segment_valence)], axis=1) + rng.normal(0, 0.3, size=(n, 2))
        text = said @ self.text_w + rng.normal(0, 0.5, size=(n, MODALITY_DIMS["text"]))

        unlabelled = _stretches(rng, n, int(rng.integers(0, 2)), 30, 200)
        labels[unlabelled] = INVALID_LABEL
        features = {"visual": visual, "audio": audio, "text": text}
        return labels.astype(np.float32), {k: v.astype(np.float32) for k, v in features.items()}


def _video_names(prefix: str, count: int, pairs: int) -> list[str]:
    """``count`` video files, the first ``pairs`` x 2 of them two-person _left/_right files."""
    names = []
    for i in range(pairs):
        names += [f"{prefix}{i:03d}_left", f"{prefix}{i:03d}_right"]
    names += [f"{prefix}{i:03d}" for i in range(pairs, pairs + count - 2 * pairs)]
    return names


def _write_labels(path: Path, labels: np.ndarray) -> None:
    lines = ["valence,arousal"] + [f"{v:.3f},{a:.3f}" if v != INVALID_LABEL else "-5,-5" for v, a in labels]
    path.write_text("\n".join(lines) + "\n")


def generate(root: str | Path, spec: DemoSpec = DemoSpec()) -> Path:
    """Write the demo dataset to ``root`` atomically (a temporary sibling folder, then a rename)."""
    root = Path(root)
    if root.exists():
        raise FileExistsError(f"{root} exists and is not a complete demo dataset; remove it or pick another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=root.parent))
    rng = np.random.default_rng(spec.seed)
    world = _World(rng)
    splits = {
        "train": _video_names("train", spec.n_train, pairs=3),
        "val": _video_names("val", spec.n_val, pairs=1),
        "test": _video_names("test", spec.n_test, pairs=1),
    }
    for modality in MODALITY_DIMS:
        (tmp / "features" / modality).mkdir(parents=True)
    truth = ["image_location,valence,arousal"]
    sample = ["image_location,valence,arousal"]
    subject_embeddings: dict[str, np.ndarray] = {}
    for split, names in splits.items():
        if split != "test":
            (tmp / LABEL_DIR / SPLIT_DIRS[split]).mkdir(parents=True, exist_ok=True)
        for index, name in enumerate(names):
            subject = name.rsplit("_left", 1)[0].rsplit("_right", 1)[0]
            embedding = subject_embeddings.setdefault(subject, rng.normal(0, 0.7, size=6))
            extra = min(rng.gamma(2.0, spec.mean_extra_frames / 2), spec.max_frames - spec.min_frames)
            n = spec.min_frames + int(extra)
            labels, features = world.video(rng, n, embedding)
            if split == "train" and index in (5, 9):
                features["visual"] = np.concatenate([features["visual"], features["visual"][-2:]])
            if split == "test" and index == 3:
                features["visual"] = features["visual"][:-10]  # frames past the feature file's end
            for modality, array in features.items():
                np.save(tmp / "features" / modality / f"{name}.npy", array)
            if split == "test":
                for frame, (v, a) in enumerate(labels, start=1):
                    truth.append(f"{name}/{frame:05d}.jpg,{v:.3f},{a:.3f}")
                    sample.append(f"{name}/{frame:05d}.jpg,,")
            else:
                _write_labels(tmp / LABEL_DIR / SPLIT_DIRS[split] / f"{name}.txt", labels)
    (tmp / TEST_LIST_NAME).write_text("\n".join(splits["test"]) + "\n")
    (tmp / TEST_SAMPLE_NAME).write_text("\n".join(sample) + "\n")
    (tmp / GROUND_TRUTH_NAME).write_text("\n".join(truth) + "\n")
    (tmp / ".complete").write_text(f"abaw demo v{VERSION} seed {spec.seed}\n")
    tmp.rename(root)
    fsync_dir(root.parent)
    return root


def load_ground_truth(root: str | Path) -> dict[str, np.ndarray]:
    """Test labels per video, (T, 2) float32 with -5 for unlabelled frames."""
    import pandas as pd

    table = pd.read_csv(Path(root) / GROUND_TRUTH_NAME)
    video = table["image_location"].str.split("/").str[0]
    return {name: group[["valence", "arousal"]].to_numpy(np.float32)
            for name, group in table.groupby(video, sort=False)}
