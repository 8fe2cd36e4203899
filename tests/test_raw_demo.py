"""The raw demo release: deterministic, shaped like the release, its signals following the latent,
and the whole path raw files -> extraction -> cross-validation -> submission running on a CPU."""
import csv
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from abaw import raw_demo
from abaw.stand_ins import ensure_stand_ins
from abaw.data import CROPS_DIR, LABEL_DIR, SPLIT_DIRS, fps_from_name, parse_label_file
from abaw.demo import LAG, TEST_LIST_NAME, TEST_SAMPLE_NAME, demo_videos
from abaw.extract.frames import extraction_targets
from abaw.metrics import score
from abaw.raw_demo import RawSpec, read_latent, video_file_name

REPO = Path(__file__).resolve().parents[1]
SMALL = RawSpec(n_train=3, n_val=1, n_test=1, min_seconds=2, max_seconds=3, crop_size=48)
SPEC = RawSpec()  # what the raw_root fixture holds
NAMES = {split: [v.name for v in demo_videos(split, count)]
         for split, count in (("train", SPEC.n_train), ("val", SPEC.n_val), ("test", SPEC.n_test))}
ALL_VIDEOS = [name for names in NAMES.values() for name in names]


def digest(root: Path) -> tuple[str, set[str]]:
    """sha256 over every file's path and bytes, and the file suffixes it covered."""
    h, suffixes = hashlib.sha256(), set()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
        suffixes.add(path.suffix)
    return h.hexdigest(), suffixes


def test_same_seed_gives_the_same_bytes_in_another_process(tmp_path):
    raw_demo.generate_raw(tmp_path / "a", SMALL)
    code = (f"from pathlib import Path; from abaw.raw_demo import RawSpec, generate_raw; "
            f"generate_raw(Path({str(tmp_path / 'b')!r}), RawSpec(**{SMALL.__dict__!r}))")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    raw_demo.generate_raw(tmp_path / "c", RawSpec(**{**SMALL.__dict__, "seed": 1}))
    (a, suffixes), (b, _), (c, _) = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    assert suffixes >= {".jpg", ".mp4", ".csv", ".txt"}  # the encoders' outputs are part of the digest
    assert a == b
    assert a != c
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no staging folder left


def test_release_layout_and_names(raw_root):
    for split, folder in SPLIT_DIRS.items():
        assert sorted(p.stem for p in (raw_root / LABEL_DIR / folder).glob("*.txt")) == sorted(NAMES[split])
    assert (raw_root / TEST_LIST_NAME).read_text().split() == NAMES["test"]
    targets = {t.video: t for t in extraction_targets(raw_root)}  # a valid root for the extractors
    assert sorted(targets) == sorted(ALL_VIDEOS)
    for video in ALL_VIDEOS:
        assert (raw_root / CROPS_DIR / video).is_dir()
        for folder in ("openface", "transcripts", "latent"):
            assert (raw_root / folder / f"{video}.csv").is_file(), (folder, video)
    video_files = sorted(p.stem for p in (raw_root / "videos").glob("*.mp4"))
    assert video_files == sorted({video_file_name(v) for v in ALL_VIDEOS})
    assert "video100_left" in ALL_VIDEOS and (raw_root / "videos" / "video100.mp4").is_file()  # sides share a file
    sample = pd.read_csv(raw_root / TEST_SAMPLE_NAME)
    truth = pd.read_csv(raw_root / "test_ground_truth.csv")
    assert sample.image_location.tolist() == truth.image_location.tolist()
    assert len(sample) == sum(targets[v].n_frames for v in NAMES["test"])


def labels_of(root, video) -> np.ndarray:
    for folder in SPLIT_DIRS.values():
        path = root / LABEL_DIR / folder / f"{video}.txt"
        if path.is_file():
            return parse_label_file(path)[0]
    truth = pd.read_csv(root / "test_ground_truth.csv")
    return truth[truth.image_location.str.startswith(f"{video}/")][["valence", "arousal"]].to_numpy(np.float32)


def test_labels_follow_the_latent_with_the_annotation_lag(raw_root):
    unlabelled = 0
    for video in ALL_VIDEOS:
        labels, latent = labels_of(raw_root, video), read_latent(raw_root, video)
        lag = round(LAG * (fps_from_name(video) or 30) / 30)
        face = np.stack([latent["valence"], latent["arousal"]], axis=1)
        later = labels[lag:]
        valid = (later != -5).all(axis=1)
        assert np.abs(later[valid] - face[:len(later)][valid]).max() < 0.002, video  # y(t) = f(t - lag)
        unlabelled += int((~valid).sum())
    assert unlabelled > 0  # -5 stretches


def frame_runs(mask: np.ndarray) -> list[int]:
    """Lengths of the runs of True in ``mask``."""
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    return (np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)).tolist()


def image_frames(root, video) -> set[int]:
    return {int(p.stem) for p in (root / CROPS_DIR / video).glob("*.jpg")}


def test_images_are_missing_exactly_at_the_recorded_frames(raw_root):
    runs, shares, past_end = [], [], []
    for video in ALL_VIDEOS:
        latent = read_latent(raw_root, video)
        assert image_frames(raw_root, video) == set(latent["frame"][latent["face"] > 0].astype(int)), video
        runs += frame_runs(latent["face"] == 0)
        shares.append(latent["face"].mean())
        n_labels = len(labels_of(raw_root, video))
        if len(latent["frame"]) > n_labels:
            past_end.append(video)
            assert max(image_frames(raw_root, video)) > n_labels
    assert 1 in runs and max(runs) >= 8  # isolated detector misses and stretches
    assert min(shares) < 0.75 < np.median(shares)  # one face mostly gone, most nearly always there
    assert len(past_end) == 1
    image = Image.open(next((raw_root / CROPS_DIR / ALL_VIDEOS[0]).glob("*.jpg")))
    assert image.size == (SPEC.crop_size, SPEC.crop_size) and image.mode == "RGB"


def pixels_and_latent(root, videos):
    xs, ys = [], []
    for video in videos:
        latent = read_latent(root, video)
        for frame in sorted(image_frames(root, video)):
            image = Image.open(root / CROPS_DIR / video / f"{frame:05d}.jpg").convert("L").resize((28, 28))
            xs.append(np.asarray(image, np.float32).ravel() / 255)
            ys.append([latent["valence"][frame - 1], latent["arousal"][frame - 1]])
    return np.array(xs), np.array(ys)


def test_faces_show_valence_and_arousal(raw_root):
    """A ridge regression from the crops' pixels, fit on train videos, reads both on validation videos."""
    x_train, y_train = pixels_and_latent(raw_root, NAMES["train"])
    x_val, y_val = pixels_and_latent(raw_root, NAMES["val"])
    mean = x_train.mean(axis=0)
    a = x_train - mean
    w = np.linalg.solve(a.T @ a + 10 * np.eye(a.shape[1]), a.T @ (y_train - y_train.mean(axis=0)))
    predicted = (x_val - mean) @ w + y_train.mean(axis=0)
    for j in range(2):
        assert np.corrcoef(predicted[:, j], y_val[:, j])[0, 1] > 0.5, j


def test_openface_csvs_list_the_face_frames_with_aus_that_follow_the_latent(raw_root):
    tables = []
    for video in ALL_VIDEOS:
        path = raw_root / "openface" / f"{video}.csv"
        assert path.read_text().startswith("frame, face_id, timestamp, confidence, success, AU01_r")  # OpenFace 2
        table = pd.read_csv(path, skipinitialspace=True)
        assert set(table.frame) == image_frames(raw_root, video), video
        latent = read_latent(raw_root, video)
        at = table.frame - 1
        tables.append(table.assign(valence=latent["valence"][at], arousal=latent["arousal"][at]))
    table = pd.concat(tables)
    assert 0 < (table.success == 0).sum() < 0.05 * len(table)
    tracked = table[table.success == 1]
    assert tracked.AU12_r.corr(tracked.valence) > 0.5
    assert tracked.AU05_r.corr(tracked.arousal) > 0.5


def read_words(root, video) -> pd.DataFrame:
    return pd.read_csv(root / "transcripts" / f"{video}.csv", dtype={"word": str}, keep_default_na=False)


def recording_sound(root, file_name) -> tuple[float, int, np.ndarray, dict]:
    """(fps, video frames, mono sound, audio stream facts) of videos/<file_name>.mp4."""
    with av.open(str(root / "videos" / f"{file_name}.mp4")) as container:
        video, audio = container.streams.video[0], container.streams.audio[0]
        facts = {"rate": audio.sample_rate, "channels": audio.channels}
        fps = float(video.average_rate)
        n_frames = sum(1 for _ in container.decode(video=0))
    with av.open(str(root / "videos" / f"{file_name}.mp4")) as container:
        sound = np.concatenate([frame.to_ndarray()[0] for frame in container.decode(audio=0)])
    return fps, n_frames, sound, facts


def spoken_by(latent, words: pd.DataFrame, fps: float) -> np.ndarray:
    """Which words this person says: they are speaking at the word's middle."""
    middle = ((words.start + words.end) / 2 * fps).astype(int).clip(0, len(latent["frame"]) - 1)
    return latent["speaking"][middle] > 0


def test_videos_carry_the_fps_and_a_sound_whose_loudness_follows_arousal(raw_root):
    loudness, arousal, silence_ratios = [], [], []
    for file_name in sorted({video_file_name(v) for v in ALL_VIDEOS}):
        sides = [v for v in ALL_VIDEOS if video_file_name(v) == file_name]
        fps, n_frames, sound, facts = recording_sound(raw_root, file_name)
        assert fps == (fps_from_name(file_name) or 30), file_name
        assert facts == {"rate": raw_demo.SAMPLE_RATE, "channels": 1}
        assert all(len(read_latent(raw_root, v)["frame"]) == n_frames for v in sides)
        assert abs(len(sound) / raw_demo.SAMPLE_RATE - n_frames / fps) < 0.2  # AAC pads its last frame
        words = read_words(raw_root, sides[0])
        rms = np.array([np.sqrt(np.mean(sound[int(s * raw_demo.SAMPLE_RATE):int(e * raw_demo.SAMPLE_RATE)] ** 2))
                        for s, e in zip(words.start, words.end)])
        for video in sides:
            latent = read_latent(raw_root, video)
            mine = spoken_by(latent, words, fps)
            middle = ((words.start + words.end) / 2 * fps).astype(int)[mine]
            loudness += np.log(rms[mine]).tolist()
            arousal += latent["arousal"][middle].tolist()
        speech = np.zeros(len(sound), bool)
        for s, e in zip(words.start, words.end):  # each word with 0.1 s either side
            speech[max(0, int((s - 0.1) * raw_demo.SAMPLE_RATE)):int((e + 0.1) * raw_demo.SAMPLE_RATE)] = True
        silence_ratios.append(np.sqrt(np.mean(sound[~speech] ** 2)) / np.median(rms))
    assert np.corrcoef(loudness, arousal)[0, 1] > 0.6
    assert max(silence_ratios) < 0.25  # every recording's silences at least 12 dB below its words


def test_transcripts_are_timed_words_with_silences_following_valence(raw_root):
    vocabulary = set(raw_demo.POSITIVE_WORDS + raw_demo.NEGATIVE_WORDS + raw_demo.FILLER_WORDS)
    valence_of = {"positive": [], "negative": []}
    for video in ALL_VIDEOS:
        path = raw_root / "transcripts" / f"{video}.csv"
        assert next(csv.reader(path.open())) == ["word", "start", "end"]
        words = read_words(raw_root, video)
        latent = read_latent(raw_root, video)
        fps = fps_from_name(video) or 30
        assert len(words) > 0 and set(words.word) <= vocabulary
        assert (words.start < words.end).all()
        assert (words.start.iloc[1:].to_numpy() >= words.end.iloc[:-1].to_numpy()).all()  # in order, no overlap
        assert words.start.min() >= 0 and words.end.max() <= len(latent["frame"]) / fps
        gaps = np.concatenate([[words.start.iloc[0]], words.start.iloc[1:].to_numpy() - words.end.iloc[:-1].to_numpy()])
        assert gaps.max() >= 0.4, video  # a silence: nobody speaks
        mine = spoken_by(latent, words, fps)
        middle = ((words.start + words.end) / 2 * fps).astype(int)
        for kind, vocab in (("positive", raw_demo.POSITIVE_WORDS), ("negative", raw_demo.NEGATIVE_WORDS)):
            valence_of[kind] += latent["valence"][middle[mine & words.word.isin(vocab)]].tolist()
    assert np.mean(valence_of["positive"]) > np.mean(valence_of["negative"]) + 0.3
    assert (raw_root / "transcripts" / "video100_left.csv").read_bytes() == \
        (raw_root / "transcripts" / "video100_right.csv").read_bytes()  # one recording, one transcript


def test_ensure_raw_demo_reuses_refuses_and_leaves_nothing_half_written(tmp_path, monkeypatch, capsys, raw_root):
    root = raw_demo.ensure_raw_demo(tmp_path / "cache", SMALL)
    stamp = (root / ".complete").stat().st_mtime_ns
    assert raw_demo.ensure_raw_demo(tmp_path / "cache", SMALL) == root
    assert (root / ".complete").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="made otherwise"):
        raw_demo.ensure_raw_demo(root, RawSpec(**{**SMALL.__dict__, "seed": 5}))
    with pytest.raises(FileExistsError, match="exists"):
        raw_demo.generate_raw(root, SMALL)

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(raw_demo, "write_video", broken)
    with pytest.raises(OSError, match="disk full"):
        raw_demo.generate_raw(tmp_path / "broken", SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # neither the root nor a staging folder
    monkeypatch.undo()
    assert raw_demo.main(["--root", str(raw_root)]) == 0  # the command prints the (reused) root
    assert capsys.readouterr().out.strip() == str(raw_root)


# ---------------------------------------------------------------------------------------------
# End to end: the raw release -> python -m abaw.extract -> run_cv.py -> make_submission.py

# One entry per feature folder: `python -m abaw.extract` arguments after --data-root/--name, "{root}"
# standing for the raw release and "{models}" for the stand-in backbones.
EXTRACTIONS = {  # what make demo-raw runs: every kind of extraction, with the stand-in backbones
    "visual": ["visual", "--backbone", "test_vit", "--weights", "{models}/vit.pth", "--workers", "0"],
    "audio": ["audio", "--videos", "{root}/videos", "--mel"],
    "text": ["text", "--transcripts", "{root}/transcripts", "--model", "{models}/text"],
    "openface": ["import", "--csv", "{root}/openface", "--frame-column", "frame",
                 "--columns", ",".join(raw_demo.OPENFACE_AUS)],
}
FAST_CV = ["--config", str(REPO / "configs" / "demo-raw.yaml"), "--folds", "2", "--epochs", "2", "--device", "cpu"]


def run(args: list[str], cwd: Path) -> str:
    """Run a command as a user would (from another folder, offline); fail with its output."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_raw_release_to_submission(raw_root, tmp_path):
    root = shutil.copytree(raw_root, tmp_path / "raw")  # the shared fixture stays without features
    models = ensure_stand_ins(tmp_path / "models", raw_demo.demo_words()).visual_weights.parent
    for name, args in EXTRACTIONS.items():
        command = [arg.format(root=root, models=models) for arg in args]
        run(["-m", "abaw.extract", command[0], "--data-root", str(root), "--name", name, *command[1:]], tmp_path)
        assert sorted(p.stem for p in (root / "features" / name).glob("*.npy")) == sorted(ALL_VIDEOS)

    run([str(REPO / "run_cv.py"), "--data-root", str(root), "--out", "runs/raw", *FAST_CV], tmp_path)
    summary = pd.read_csv(tmp_path / "runs" / "raw" / "summary.csv")
    assert np.isfinite(summary[summary.fold == "oof"].ccc).all()

    run([str(REPO / "make_submission.py"), "--runs", "runs/raw", "--out", "submissions/raw"], tmp_path)
    predictions = tmp_path / "submissions" / "raw" / "predictions.txt"
    run([str(REPO / "make_submission.py"), "--check", str(predictions), "--sample", str(root / TEST_SAMPLE_NAME)],
        tmp_path)
    submitted = pd.read_csv(predictions)
    truth = pd.read_csv(root / "test_ground_truth.csv")
    assert submitted.image_location.tolist() == truth.image_location.tolist()
    columns = ["valence", "arousal"]
    test_ccc = score(submitted[columns].to_numpy(), truth[columns].to_numpy())["mean"]
    assert test_ccc > 0.15, test_ccc  # learnt from the imported AUs (0.36 here after 2 epochs), not noise
