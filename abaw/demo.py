"""A deterministic, Aff-Wild2-shaped demo dataset that stands in for the licensed original.

Shaped like the release (see ``abaw/resources/affwild2_shape.csv``, the real release's names,
splits, lengths and face shares):

* its naming schemes: ``105``, ``10-60-1280x720`` (id-fps-resolution), ``video59``,
  ``video55_left`` / ``_right``, recordings cut into numbered parts (``video86_1`` ... and
  ``122-60-1920x1080-1`` ...), both at once (``video10_1_left``), a recording whose left side has
  no suffix (``10-60-1280x720`` + ``10-60-1280x720_right``), and the same id naming two different
  recordings in two splits (``105`` and ``105-30-640x480``). The parts and sides of a recording
  share its people and scene, so a fold that splits them leaks;
* frame rates 24-60 fps (in the names; time constants and the annotation lag scale with them);
* frames without a face: stretches, isolated detector misses, and videos where the face is
  mostly missing (face shares from 0.05 to 1), written as NaN rows;
* stretches of -5 labels; feature files a few rows off the frame count (within the tolerance).

The labels are learnable only with temporal context:

* a smooth latent "expressed emotion" f(t) per video (valence, arousal), made by low-pass
  filtering white noise twice, so it drifts over a few seconds;
* annotators react late: the label is y(t) = f(t - lag) with a lag of ``LAG`` frames at 30 fps;
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
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.signal import lfilter

from .data import INVALID_LABEL, LABEL_DIR, SPLIT_DIRS, fps_from_name, image_location
from .io import fsync_dir

VERSION = 2
LAG = 12  # frames (at 30 fps) between the face showing an emotion and the annotation following it
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
    # Settings that make another kind of dataset (see SHORT_SPEC); the defaults are the demo's.
    dims: tuple[tuple[str, int], ...] = tuple(MODALITY_DIMS.items())  # modality -> feature width
    tempo: float = 1.0            # time constants of the emotion's drift are multiplied by this
    valence_signal: float = 1.0   # within-video valence movement shown by the face (1 = the demo's)
    valence_offset: float = 0.0   # std of a per-recording valence level, shown by the face
    annotator_bias: float = 0.0   # std of a per-video valence bias in the labels only: nothing shows it
    jitter: float = 1.0           # std of the per-frame expression jitter on the face
    label_gap_frames: tuple[int, int] = (30, 200)  # lengths of -5 stretches
    face_gap_frames: tuple[int, int] = (10, 60)    # lengths of no-face stretches

    @property
    def modality_dims(self) -> dict[str, int]:
        return dict(self.dims)


# A second kind of dataset, shaped like the small real one on which a context ridge beat the
# toolkit's default (160 sequences, about 8,500 labelled frames, 20-d features, valence weak:
# OOF CCC 0.14-0.17 against 0.65-0.68 for arousal). Few, short videos (30-150 frames), fast
# emotion changes, one 20-d visual stream, and a valence that is mostly a per-video level: part
# shown by the face (visible in the video's mean features), part an annotator's bias nothing shows.
SHORT_SPEC = DemoSpec(n_train=100, n_val=30, n_test=30, min_frames=30, max_frames=150, mean_extra_frames=35,
                      seed=1, dims=(("visual", 20),), tempo=0.5, valence_signal=0.3, valence_offset=0.15,
                      annotator_bias=0.3, jitter=0.5, label_gap_frames=(3, 12), face_gap_frames=(2, 8))
SPECS = {"demo": DemoSpec(), "short": SHORT_SPEC}


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


def stretches(rng, n: int, count: int, lo: int, hi: int) -> np.ndarray:
    """Boolean (n,) mask of ``count`` random stretches of length lo..hi."""
    mask = np.zeros(n, bool)
    for _ in range(count):
        length = int(rng.integers(lo, hi))
        start = int(rng.integers(0, max(1, n - length)))
        mask[start:start + length] = True
    return mask


# The release's naming schemes, one recording each: (scheme, number of files). The first entries
# of each split come first in small demos, so even a 6-video demo has parts and sides.
_SCHEMES = {
    "train": [("sides", 2), ("plain", 1), ("parts", 3), ("res", 1), ("video", 1), ("res_parts", 3), ("plain", 1),
              ("half_sides", 2), ("res", 1), ("res_sides", 2), ("video", 1)],
    "val": [("plain_clash", 1), ("plain", 1), ("parts", 3), ("sides", 2), ("res", 1), ("video", 1)],
    "test": [("parts", 3), ("res", 1), ("parts_sides", 2), ("plain", 1), ("sides", 2), ("video", 1)],
}
_SINGLES = ("plain", "res", "video")  # what a split's list repeats once its recordings run out
_FPS = (30, 25, 60, 24, 30)
_RESOLUTIONS = ("1280x720", "1920x1080", "640x480", "480x360")


@dataclass(frozen=True)
class DemoVideo:
    """One video file of the demo: its name, the recording it belongs to, and its side (person)."""

    name: str
    recording: str
    person: str
    fps: int


def _recording_files(scheme: str, count: int, number: int, clash_id: int) -> list[tuple[str, str]]:
    """(file name, person) of one recording in ``scheme``, with ids derived from ``number``."""
    fps, resolution = _FPS[number % len(_FPS)], _RESOLUTIONS[number % len(_RESOLUTIONS)]
    res = f"{number}-{fps}-{resolution}"
    if scheme == "plain":
        return [(str(number), "a")]
    if scheme == "plain_clash":  # the id of a train video, another recording (as 105 / 105-30-1280x720)
        return [(f"{clash_id}-30-640x480", "a")]
    if scheme == "res":
        return [(res, "a")]
    if scheme == "video":
        return [(f"video{number}", "a")]
    if scheme == "sides":
        return [(f"video{number}_left", "left"), (f"video{number}_right", "right")]
    if scheme == "res_sides":
        return [(f"{res}_left", "left"), (f"{res}_right", "right")]
    if scheme == "half_sides":  # the left person's file has no suffix
        return [(res, "left"), (f"{res}_right", "right")]
    if scheme == "parts":
        return [(f"video{number}_{i}", "a") for i in range(1, count + 1)]
    if scheme == "res_parts":
        return [(f"{res}-{i}", "a") for i in range(1, count + 1)]
    if scheme == "parts_sides":
        return [(f"video{number}_1_left", "left"), (f"video{number}_1_right", "right")]
    raise ValueError(f"unknown naming scheme {scheme!r}")


def demo_videos(split: str, count: int) -> list[DemoVideo]:
    """``count`` video files of ``split`` in the release's naming schemes (ids unique per split)."""
    base = {"train": 100, "val": 300, "test": 500}[split]
    schemes = list(_SCHEMES[split])
    videos: list[DemoVideo] = []
    number = base
    while len(videos) < count:
        scheme, files = schemes.pop(0) if schemes else (_SINGLES[number % 3], 1)
        for name, person in _recording_files(scheme, files, number, clash_id=101):
            recording = f"{split}:{number}"
            videos.append(DemoVideo(name, recording, f"{recording}:{person}", fps_from_name(name) or 30))
        number += 1
    return videos[:count]


def latent_emotion(rng: np.random.Generator, n: int, mood: np.ndarray, fps: int,
                   spec: DemoSpec = DemoSpec()) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n, 2) and the expressed emotion f (n, 2) of one video: smooth (valence, arousal) in (-1, 1).

    The labels follow f late: y(t) = f(t - lag), with a lag of ``LAG`` frames at 30 fps."""
    speed = fps / 30  # emotions drift over seconds, so over more frames at a higher frame rate
    lag = round(LAG * speed)
    face = np.stack([_smooth(rng, n + lag, 40.0 * speed * spec.tempo), _smooth(rng, n + lag, 60.0 * speed * spec.tempo)],
                    axis=1)
    face[:, 0] *= spec.valence_signal
    face = 0.85 * np.tanh(0.55 * face + mood + rng.normal(0, 0.08, size=2))  # per-recording mood
    labels = face[:n].copy()  # y(t) = f(t - lag): frame t of the labels sees face frame t - lag
    return labels, face[lag:]


class _World:
    """The fixed random mappings from latent emotion to features, shared by all videos."""

    def __init__(self, rng: np.random.Generator, spec: DemoSpec = DemoSpec()):
        self.spec = spec
        dims = {**MODALITY_DIMS, **spec.modality_dims}  # drawn for every modality: the demo's draws stay the same
        self.visual_w = rng.standard_normal((7, dims["visual"])) / np.sqrt(2)
        self.visual_subject_w = rng.standard_normal((6, dims["visual"])) / np.sqrt(6)
        self.audio_w = rng.standard_normal((3, dims["audio"]))
        self.text_w = rng.standard_normal((2, dims["text"]))

    @staticmethod
    def _basis(o: np.ndarray) -> np.ndarray:
        v, a = o[:, 0], o[:, 1]
        return np.stack([v, a, v * v, a * a, v * a, np.sin(np.pi * v), np.cos(np.pi * a)], axis=1)

    def video(self, rng, n: int, subject_embedding: np.ndarray, mood: np.ndarray, fps: int,
              face_share: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Labels (n, 2) and features of one video."""
        spec = self.spec
        labels, face = latent_emotion(rng, n, mood, fps, spec)

        shown = face + rng.normal(0, spec.jitter, size=face.shape)  # per-frame jitter: only time averages see f
        visual = np.tanh(self._basis(shown) @ self.visual_w + subject_embedding @ self.visual_subject_w)
        visual += rng.normal(0, 0.3, size=visual.shape)
        visual[_no_face(rng, n, face_share, spec.face_gap_frames)] = np.nan

        heard = face[:, 1:2] + rng.normal(0, 0.8, size=(n, 1))
        audio = np.concatenate([heard, heard ** 2, np.sin(2 * heard)], axis=1) @ self.audio_w
        audio += rng.normal(0, 0.5, size=audio.shape)

        segment = np.repeat(np.arange(n // 150 + 1), 150)[:n]
        segment_valence = np.array([face[segment == s, 0].mean() for s in np.unique(segment)])[segment]
        said = np.stack([segment_valence, np.abs(segment_valence)], axis=1) + rng.normal(0, 0.3, size=(n, 2))
        text = said @ self.text_w + rng.normal(0, 0.5, size=(n, MODALITY_DIMS["text"]))

        if spec.annotator_bias > 0:  # a per-video level in the labels that no feature shows
            labels[:, 0] = np.clip(labels[:, 0] + rng.normal(0, spec.annotator_bias), -1, 1)
        unlabelled = stretches(rng, n, int(rng.integers(0, 2)), *spec.label_gap_frames)
        labels[unlabelled] = INVALID_LABEL
        features = {"visual": visual, "audio": audio, "text": text}
        return labels.astype(np.float32), {k: features[k].astype(np.float32) for k in spec.modality_dims}


def _no_face(rng, n: int, face_share: float, gap_frames: tuple[int, int] = (10, 60)) -> np.ndarray:
    """Frames without a face: isolated detector misses, stretches, and long absences down to ``face_share``."""
    missing = rng.random(n) < 0.004
    missing |= stretches(rng, n, int(rng.integers(0, 3)), *gap_frames)
    while missing.mean() < 1 - face_share:  # the face mostly gone: long stretches until the share is reached
        missing |= stretches(rng, n, 1, n // 10, n // 3)
    return missing


def _mood(rng, spec: DemoSpec) -> np.ndarray:
    """A recording's (valence, arousal) level; with ``valence_offset`` the valence level varies more."""
    mood = rng.normal(0, 0.12, size=2)
    if spec.valence_offset > 0:
        mood[0] += rng.normal(0, spec.valence_offset)
    return mood


def _face_share(index: int) -> float:
    """Most faces are found almost everywhere (the release's median face share is 0.99); a few are not."""
    return {4: 0.5, 7: 0.05}.get(index, 1.0)


def write_labels(path: Path, labels: np.ndarray) -> None:
    """An annotation file: the header, then one "valence,arousal" line per frame (-5,-5 unlabelled)."""
    lines = ["valence,arousal"] + [f"{v:.3f},{a:.3f}" if v != INVALID_LABEL else "-5,-5" for v, a in labels]
    path.write_text("\n".join(lines) + "\n")


SAMPLE_HEADER_LINE = "image_location,valence,arousal"


def ground_truth_rows(video: str, labels: np.ndarray) -> tuple[list[str], list[str]]:
    """A test video's ground-truth lines and sample-file lines (the same frames, values left empty)."""
    truth = [f"{image_location(video, frame)},{v:.3f},{a:.3f}" for frame, (v, a) in enumerate(labels, start=1)]
    sample = [f"{image_location(video, frame)},," for frame in range(1, len(labels) + 1)]
    return truth, sample


def write_test_files(folder: Path, test_videos: list[str], truth: list[str], sample: list[str]) -> None:
    """The test list, the sample file and ``test_ground_truth.csv`` (rows without their headers)."""
    (folder / TEST_LIST_NAME).write_text("\n".join(test_videos) + "\n")
    (folder / TEST_SAMPLE_NAME).write_text("\n".join([SAMPLE_HEADER_LINE, *sample]) + "\n")
    (folder / GROUND_TRUTH_NAME).write_text("\n".join([SAMPLE_HEADER_LINE, *truth]) + "\n")


@contextmanager
def staged_folder(root: Path, what: str) -> Iterator[Path]:
    """A temporary sibling of ``root`` to fill, renamed to ``root`` on success and removed on failure,
    so ``root`` is either absent or complete. An existing ``root`` is never touched."""
    if root.exists():
        raise FileExistsError(f"{root} exists and is not a complete {what}; remove it or pick another folder")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        yield tmp
        tmp.rename(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    fsync_dir(root.parent)


def generate(root: str | Path, spec: DemoSpec = DemoSpec()) -> Path:
    """Write the demo dataset to ``root`` atomically (a temporary sibling folder, then a rename)."""
    root = Path(root)
    with staged_folder(root, "demo dataset") as tmp:
        _generate_into(tmp, spec)
    return root


def _generate_into(tmp: Path, spec: DemoSpec) -> None:
    rng = np.random.default_rng(spec.seed)
    world = _World(rng, spec)
    splits = {"train": demo_videos("train", spec.n_train), "val": demo_videos("val", spec.n_val),
              "test": demo_videos("test", spec.n_test)}
    for modality in spec.modality_dims:
        (tmp / "features" / modality).mkdir(parents=True)
    truth: list[str] = []
    sample: list[str] = []
    scenes: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # recording -> (scene embedding, mood)
    people: dict[str, np.ndarray] = {}
    for split, videos in splits.items():
        if split != "test":
            (tmp / LABEL_DIR / SPLIT_DIRS[split]).mkdir(parents=True, exist_ok=True)
        for index, video in enumerate(videos):
            # Drawn for every video, kept for the first of a recording (so the demo's draws stay as they were)
            scene, mood = scenes.setdefault(video.recording, (rng.normal(0, 0.5, size=6), _mood(rng, spec)))
            person = people.setdefault(video.person, scene + rng.normal(0, 0.5, size=6))
            extra = min(rng.gamma(2.0, spec.mean_extra_frames / 2), spec.max_frames - spec.min_frames)
            n = spec.min_frames + int(extra)
            labels, features = world.video(rng, n, person, mood, video.fps, _face_share(index))
            if split == "train" and index in (5, 9):
                features["visual"] = np.concatenate([features["visual"], features["visual"][-2:]])
            if split == "test" and index == 3:
                features["visual"] = features["visual"][:-3]  # frames past the feature file's end
            for modality, array in features.items():
                np.save(tmp / "features" / modality / f"{video.name}.npy", array)
            if split == "test":
                video_truth, video_sample = ground_truth_rows(video.name, labels)
                truth += video_truth
                sample += video_sample
            else:
                write_labels(tmp / LABEL_DIR / SPLIT_DIRS[split] / f"{video.name}.txt", labels)
    write_test_files(tmp, [v.name for v in splits["test"]], truth, sample)
    (tmp / ".complete").write_text(f"abaw demo v{VERSION} seed {spec.seed}\n")


def load_ground_truth(root: str | Path) -> dict[str, np.ndarray]:
    """Test labels per video, (T, 2) float32 with -5 for unlabelled frames."""
    import pandas as pd

    table = pd.read_csv(Path(root) / GROUND_TRUTH_NAME)
    video = table["image_location"].str.split("/").str[0]
    return {name: group[["valence", "arousal"]].to_numpy(np.float32)
            for name, group in table.groupby(video, sort=False)}
