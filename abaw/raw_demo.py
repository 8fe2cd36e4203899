"""A tiny, deterministic raw Aff-Wild2 release: what the extractors read, made in seconds on a CPU.

The built-in demo (:mod:`abaw.demo`) ships finished feature files; this fixture ships what the
release ships, so ``python -m abaw.extract`` can be run (and tested) end to end without the
licensed data::

    ROOT/VA_Estimation_Challenge/{Train_Set,Validation_Set}/<video>.txt   labels, -5 stretches
    ROOT/<test list>, ROOT/<test sample>, ROOT/test_ground_truth.csv      as the demo writes them
    ROOT/cropped_aligned/<video>/00001.jpg   square face crops, none where the face is missing
    ROOT/videos/<recording>.mp4              32x32 video at the name's frame rate + 16 kHz mono AAC sound
    ROOT/transcripts/<video>.csv             word,start,end (seconds), silences between turns
    ROOT/openface/<video>.csv                OpenFace-2-style rows (``frame, face_id, ...``), face frames only
    ROOT/latent/<video>.csv                  frame,valence,arousal,face,speaking: what made it all (tests)
    ROOT/EXPR_Recognition_Challenge/{Train_Set,Validation_Set}/<video>.txt   expression labels (since v2)

Names come from :func:`abaw.demo.demo_videos` (release-shaped: sides, parts, fps in names); the
``_left`` / ``_right`` files of a recording share one video file named without the suffix, as in
the release, and so share its length. Each person has a latent expressed emotion f(t) and the
labels follow it with the demo's annotation lag (:func:`abaw.demo.latent_emotion`). Every modality
shows f(t) through per-frame jitter:

* face crops: mouth curvature follows valence, eye opening, brow height and mouth opening follow
  arousal, a frown (brows' inner ends down) follows negative valence; per person face shape and
  skin tone, per recording background, per frame head position jitter. Missing images: isolated
  detector misses, stretches, one video with its face gone for a third to a half;
* sound: a harmonic voice, during speech turns only, whose loudness and pitch rise with the
  speaker's arousal, over a faint noise floor; in a two-person recording the sides take turns;
* transcripts: the words said in the turns, positive words when the speaker's valence is high,
  negative when low, fillers in between; nothing in the silences. The sides of a recording share
  the recording's transcript (a transcriber does not know who spoke);
* OpenFace CSVs: action-unit intensities (AU12 with valence, AU05/AU26 with arousal, ...), listing
  only frames with an image; a few rows with ``success`` 0 (tracking failed, zero values).

Expression labels (:func:`expression_labels`, for ``python -m abaw.pretrain expr``) name the emotion
each face shows (f(t) with its per-frame jitter, as drawn), one of the challenge's 8 classes from its
point on the valence-arousal circle: Neutral within radius 0.2 of the centre, else by angle from the
positive valence axis (counter-clockwise, arousal up) Happiness 0-45 degrees, Surprise 45-90, Fear
90-120, Anger 120-150, Disgust 150-195, Sadness 195-270, Other (calm and content) 270-360. Frames in
the ring of radius 0.2-0.25 (between Neutral and an emotion), within 3 degrees of a sector boundary,
or without a face are -1 (no label). No random draw is involved: the other files are the bytes of v1.

One train video has 3 images (and CSV rows, and video frames) past its annotation's end, as some
release videos do. Same seed, same bytes: PIL's JPEG encoder and FFmpeg's mpeg4/AAC encoders with
one thread are deterministic, and the mp4 muxer writes no creation time unless asked
(``tests/test_raw_demo.py`` checks the digest of every file).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .data import CROPS_DIR, INVALID_LABEL, LABEL_DIR, SPLIT_DIRS
from .demo import (DemoVideo, demo_videos, ground_truth_rows, latent_emotion, staged_folder, stretches,
                   write_labels, write_test_files)
from .subjects import video_file_of

VERSION = 2  # bump when the output changes: the cache folder is named after it
SAMPLE_RATE = 16_000
VIDEO_SIZE = 32  # the video stream only carries the frame rate and timing; the crops carry the faces
RELEASE_CROP_SIZE = 112
OPENFACE_AUS = ("AU01_r", "AU02_r", "AU04_r", "AU05_r", "AU06_r", "AU12_r", "AU15_r", "AU26_r")
# How each AU's intensity follows (valence, arousal), and its level at (0, 0).
_AU_WEIGHTS = np.array([[0.0, 1.0], [0.0, 0.9], [-1.2, 0.0], [0.0, 1.1], [1.1, 0.0], [1.5, 0.0], [-1.0, 0.0],
                        [0.0, 1.0]])
_AU_BASE = np.array([1.2, 1.0, 1.0, 1.0, 1.0, 1.3, 0.8, 1.0])
POSITIVE_WORDS = ("great", "love", "happy", "wonderful", "fun", "nice", "yes", "beautiful", "amazing", "glad")
NEGATIVE_WORDS = ("bad", "hate", "sad", "awful", "angry", "no", "terrible", "sorry", "worse", "tired")
FILLER_WORDS = ("the", "and", "so", "then", "we", "it", "was", "like", "just", "okay")
EXTRA_FRAMES = 3  # images past the annotation's end of one train video
EXPR_DIR = "EXPR_Recognition_Challenge"
EXPR_HEADER = "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other"
# (upper bound in degrees, class index) of each sector of the valence-arousal circle, counter-clockwise
EXPR_SECTORS = ((45, 4), (90, 6), (120, 3), (150, 1), (195, 2), (270, 5), (360, 7))
NEUTRAL_RADIUS, AMBIGUOUS_RADIUS, AMBIGUOUS_DEGREES = 0.2, 0.25, 3.0


@dataclass(frozen=True)
class RawSpec:
    n_train: int = 10  # videos, counting each _left/_right file as one
    n_val: int = 4
    n_test: int = 4
    min_seconds: float = 5.0  # lengths in seconds: 150-360 frames at 30 fps, twice that at 60
    max_seconds: float = 12.0
    crop_size: int = RELEASE_CROP_SIZE  # the release's crops are 112x112
    seed: int = 0

    def stamp(self) -> str:
        return f"abaw raw demo v{VERSION} {self}\n"


def default_raw_root() -> Path:
    """$ABAW_RAW_DEMO_ROOT, else ``raw-demo-v<VERSION>`` in the user's cache folder (beside the demo's)."""
    if os.environ.get("ABAW_RAW_DEMO_ROOT"):
        return Path(os.environ["ABAW_RAW_DEMO_ROOT"])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "abaw" / f"raw-demo-v{VERSION}"


def ensure_raw_demo(root: str | Path | None = None, spec: RawSpec = RawSpec()) -> Path:
    """Generate the raw fixture into ``root`` on first use; reuse it afterwards (if made with ``spec``)."""
    root = Path(root) if root is not None else default_raw_root()
    complete = root / ".complete"
    if complete.exists():
        if complete.read_text() != spec.stamp():
            raise FileExistsError(f"{root} holds a raw demo made otherwise ({complete.read_text().strip()}); "
                                  f"remove it or pick another folder")
        return root
    return generate_raw(root, spec)


def video_file_name(video: str) -> str:
    """The release's video file of an annotation name: the sides of a recording share one file."""
    return video_file_of(video)


# ---------------------------------------------------------------------------------------------
# People and scenes


@dataclass(frozen=True)
class Person:
    """How one person looks and sounds, whatever they feel."""

    face_w: float  # half-width of the face, pixels of a 112 crop
    face_h: float
    skin: tuple[int, int, int]
    eye_gap: float
    pitch: float  # Hz at arousal 0
    au_offset: np.ndarray  # per-AU level of this face


_SKIN_TONES = ((241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (255, 219, 172))


def new_person(rng: np.random.Generator) -> Person:
    tone = np.array(_SKIN_TONES[int(rng.integers(len(_SKIN_TONES)))]) + rng.integers(-12, 13, size=3)
    return Person(float(rng.uniform(33, 41)), float(rng.uniform(43, 51)), tuple(int(c) for c in tone.clip(0, 255)),
                  float(rng.uniform(13, 17)), float(rng.uniform(100, 220)), rng.normal(0, 0.3, size=len(OPENFACE_AUS)))


@dataclass
class Track:
    """One annotation file's person in one recording: latent, labels, shown emotion and missing faces."""

    video: DemoVideo
    split: str
    person: Person
    face: np.ndarray  # (n_video, 2) expressed emotion f(t)
    labels: np.ndarray  # (n_labels, 2)
    shown: np.ndarray  # (n_video, 2) f(t) plus per-frame jitter: what the face and the AUs show
    no_face: np.ndarray  # (n_video,) bool
    shift: np.ndarray  # (n_video, 2) head position jitter, pixels
    speaking: np.ndarray | None = None  # (n_video,) bool, set with the recording's speech


def no_face_frames(rng: np.random.Generator, n: int, mostly_gone: bool) -> np.ndarray:
    """Isolated detector misses and stretches without a face; with ``mostly_gone`` a long absence too."""
    missing = rng.random(n) < 0.01
    missing |= stretches(rng, n, int(rng.integers(1, 3)), 8, 40)
    if mostly_gone:
        missing |= stretches(rng, n, 1, n // 3, n // 2)
    return missing


def new_track(rng, video: DemoVideo, split: str, person: Person, mood: np.ndarray, n_labels: int, n_video: int,
              index: int) -> Track:
    labels, face = latent_emotion(rng, n_video, mood, video.fps)
    labels = labels[:n_labels]
    if split == "train" and index % 3 == 2:  # stretches the annotators left out
        labels[stretches(rng, n_labels, 1, 15, 60)] = INVALID_LABEL
    shown = np.clip(face + rng.normal(0, 0.25, size=face.shape), -1, 1)
    return Track(video, split, person, face, labels, shown, no_face_frames(rng, n_video, index == 4),
                 rng.normal(0, 1.0, size=(n_video, 2)))


# ---------------------------------------------------------------------------------------------
# Faces


def draw_face(person: Person, background: tuple[int, int, int], valence: float, arousal: float,
              shift: np.ndarray, size: int) -> Image.Image:
    """A face crop drawn on a 112-pixel grid scaled to ``size``."""
    s = size / RELEASE_CROP_SIZE
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    cx, cy = 56 + shift[0], 60 + shift[1]

    def box(x, y, rx, ry):
        return [(x - rx) * s, (y - ry) * s, (x + rx) * s, (y + ry) * s]

    draw.ellipse(box(cx, cy, person.face_w, person.face_h), fill=person.skin)
    openness = (arousal + 1) / 2  # 0 (calm) .. 1 (excited)
    eye_y = cy - 12
    for side in (-1, 1):
        eye_x = cx + side * person.eye_gap
        lid = 1.5 + 4.0 * openness
        draw.ellipse(box(eye_x, eye_y, 7, lid), fill=(245, 245, 245))
        draw.ellipse(box(eye_x, eye_y, 2.5, min(2.5, lid)), fill=(40, 30, 20))
        brow_y = eye_y - 9 - 6 * openness
        frown = 4 * max(-valence, 0.0)  # the brows' inner ends come down
        draw.line([((eye_x + side * 8) * s, brow_y * s), ((eye_x - side * 8) * s, (brow_y + frown) * s)],
                  fill=(60, 40, 30), width=max(1, round(3 * s)))
    draw.polygon(mouth_outline(cx, cy + 24, valence, openness, s), fill=(150, 40, 50))
    return image


def mouth_outline(x: float, y: float, valence: float, openness: float, s: float) -> list[tuple[float, float]]:
    """Upper lip curved by valence (corners up when positive), lower lip lower as arousal opens the mouth."""
    u = np.linspace(-1, 1, 13)
    upper = y + 7 * valence * (0.5 - u ** 2)
    lower = upper + (1 + 5 * openness) * (1 - u ** 2) + 1
    xs = x + 14 * u
    points = list(zip(xs, upper)) + list(zip(xs[::-1], lower[::-1]))
    return [(px * s, py * s) for px, py in points]


def track_images(track: Track, background: tuple[int, int, int], size: int) -> list[Image.Image | None]:
    """Every frame's crop, None where there is no face."""
    return [None if missing else draw_face(track.person, background, float(v), float(a), shift, size)
            for missing, (v, a), shift in zip(track.no_face, track.shown, track.shift)]


def write_crops(folder: Path, images: list[Image.Image | None]) -> None:
    folder.mkdir(parents=True)
    for frame, image in enumerate(images, start=1):
        if image is not None:
            image.save(folder / f"{frame:05d}.jpg", quality=90)


# ---------------------------------------------------------------------------------------------
# Speech: turns, words and sound


@dataclass(frozen=True)
class Word:
    text: str
    start: float
    end: float
    speaker: int  # index into the recording's tracks
    gain: float  # word-to-word loudness jitter: loudness follows arousal on average, not word by word


def speech_turns(rng, duration: float, speakers: int) -> list[tuple[float, float, int]]:
    """(start, end, speaker) turns of 1-2.5 s separated by 0.4-1.2 s of silence; at least one."""
    turns, t = [], float(rng.uniform(0.2, 0.8))
    while True:
        length = float(rng.uniform(1.0, 2.5))
        if t + length > duration - 0.2:
            break
        turns.append((t, t + length, int(rng.integers(speakers))))
        t += length + float(rng.uniform(0.4, 1.2))
    return turns or [(0.3 * duration, 0.8 * duration, 0)]


def pick_word(rng, valence: float) -> str:
    """A filler a third of the time; else a positive or negative word by the valence's sign, near 0 a filler."""
    if rng.random() < 0.35 or abs(valence) < 0.15:
        words = FILLER_WORDS
    else:
        words = POSITIVE_WORDS if valence > 0 else NEGATIVE_WORDS
    return words[int(rng.integers(len(words)))]


def speech_words(rng, tracks: list[Track], duration: float, fps: int) -> list[Word]:
    """The words of every turn, 0.18-0.4 s each, chosen by the speaker's valence at the word."""
    words = []
    for start, end, speaker in speech_turns(rng, duration, len(tracks)):
        t = start
        while True:
            length = float(rng.uniform(0.18, 0.4))
            if t + length > end:
                break
            frame = min(int((t + length / 2) * fps), len(tracks[speaker].face) - 1)
            text = pick_word(rng, float(tracks[speaker].face[frame, 0]))
            words.append(Word(text, t, t + length, speaker, float(np.exp(rng.normal(0, 0.3)))))
            t += length + float(rng.uniform(0.03, 0.1))
    return words


def speech_sound(rng, words: list[Word], tracks: list[Track], n_samples: int, fps: int) -> np.ndarray:
    """A harmonic voice under each word (a Hann envelope), louder and higher with the speaker's arousal.

    Loudness is exp(1.2 arousal) times the word's gain: 3.3x (10 dB) from arousal -0.5 to 0.5."""
    times = np.arange(n_samples) / SAMPLE_RATE
    envelope = np.zeros(n_samples)
    speaker = np.full(n_samples, -1)
    for word in words:
        i, j = int(word.start * SAMPLE_RATE), min(int(word.end * SAMPLE_RATE), n_samples)
        envelope[i:j] = word.gain * np.hanning(j - i)
        speaker[i:j] = word.speaker
    arousal, pitch = np.zeros(n_samples), np.zeros(n_samples)
    for k, track in enumerate(tracks):
        mine = speaker == k
        arousal[mine] = np.interp(times[mine], np.arange(len(track.face)) / fps, track.face[:, 1])
        pitch[mine] = track.person.pitch * 2 ** (0.5 * arousal[mine])
    phase = 2 * np.pi * np.cumsum(pitch) / SAMPLE_RATE
    voice = sum(h * np.sin((k + 1) * phase) for k, h in enumerate((1.0, 0.5, 0.3, 0.2)))
    sound = 0.12 * np.exp(1.2 * arousal) * envelope * voice + rng.normal(0, 0.003, n_samples)
    return np.clip(sound, -1, 1).astype(np.float32)


def speaking_frames(words: list[Word], speaker: int, n_frames: int, fps: int) -> np.ndarray:
    """Frames whose time (frame i + 1 at i / fps seconds) falls inside one of ``speaker``'s words."""
    times = np.arange(n_frames) / fps
    speaking = np.zeros(n_frames, bool)
    for word in words:
        if word.speaker == speaker:
            speaking |= (times >= word.start) & (times < word.end)
    return speaking


def write_transcript(path: Path, words: list[Word]) -> None:
    lines = ["word,start,end"] + [f"{w.text},{w.start:.3f},{w.end:.3f}" for w in words]
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# The video file


def video_frames(images_by_track: list[list[Image.Image | None]], background, n_frames: int) -> list[np.ndarray]:
    """VIDEO_SIZE-square RGB frames: the recording's faces side by side, the background where one is missing."""
    width = VIDEO_SIZE // len(images_by_track)
    blank = np.full((VIDEO_SIZE, width, 3), background, np.uint8)
    frames = []
    for i in range(n_frames):
        faces = [blank if images[i] is None else np.asarray(images[i].resize((width, VIDEO_SIZE), Image.NEAREST))
                 for images in images_by_track]
        frames.append(np.ascontiguousarray(np.hstack(faces)))
    return frames


def write_video(path: Path, frames: list[np.ndarray], sound: np.ndarray, fps: int) -> None:
    """An mp4 of mpeg4 video at ``fps`` and mono AAC sound at 16 kHz, single-threaded (deterministic)."""
    import av

    with av.open(str(path), "w", format="mp4") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width = video.height = VIDEO_SIZE
        video.pix_fmt = "yuv420p"
        video.codec_context.thread_count = 1
        audio = container.add_stream("aac", rate=SAMPLE_RATE)
        audio.layout = "mono"
        audio.bit_rate = 48_000
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = index
            frame.time_base = Fraction(1, fps)
            container.mux(video.encode(frame))
        container.mux(video.encode())
        for start in range(0, len(sound), 1024):  # AAC frames hold 1024 samples
            frame = av.AudioFrame.from_ndarray(sound[None, start:start + 1024], format="fltp", layout="mono")
            frame.sample_rate = SAMPLE_RATE
            frame.pts = start
            frame.time_base = Fraction(1, SAMPLE_RATE)
            container.mux(audio.encode(frame))
        container.mux(audio.encode())


# ---------------------------------------------------------------------------------------------
# Per-frame CSVs and the latent


def openface_rows(rng, track: Track, fps: int) -> list[str]:
    """OpenFace 2 rows (``, ``-separated) for the frames with a face; ~1% tracking failures (success 0)."""
    aus = np.clip(_AU_BASE + track.person.au_offset + track.shown @ _AU_WEIGHTS.T
                  + rng.normal(0, 0.25, size=(len(track.shown), len(OPENFACE_AUS))), 0, 5)
    failed = rng.random(len(track.shown)) < 0.01
    confidence = np.where(failed, rng.uniform(0.05, 0.3, len(failed)), rng.uniform(0.85, 0.98, len(failed)))
    rows = []
    for i in np.flatnonzero(~track.no_face):
        values = np.zeros(len(OPENFACE_AUS)) if failed[i] else aus[i]
        cells = [str(i + 1), "0", f"{i / fps:.3f}", f"{confidence[i]:.2f}", "0" if failed[i] else "1"]
        rows.append(", ".join(cells + [f"{v:.2f}" for v in values]))
    return rows


def write_openface(path: Path, rows: list[str]) -> None:
    header = ", ".join(["frame", "face_id", "timestamp", "confidence", "success", *OPENFACE_AUS])
    path.write_text("\n".join([header, *rows]) + "\n")


def expression_labels(shown: np.ndarray, no_face: np.ndarray) -> np.ndarray:
    """(n,) class indices 0-7 of the shown (valence, arousal), -1 where ambiguous or faceless (module doc)."""
    valence, arousal = shown[:, 0], shown[:, 1]
    radius = np.hypot(valence, arousal)
    degrees = np.degrees(np.arctan2(arousal, valence)) % 360
    bounds = np.array([b for b, _ in EXPR_SECTORS], dtype=float)
    labels = np.array([c for _, c in EXPR_SECTORS])[np.searchsorted(bounds, degrees, side="right").clip(0, 6)]
    labels = np.where(radius < NEUTRAL_RADIUS, 0, labels)
    edge = np.min(np.abs(degrees[:, None] - np.array([0.0, *bounds])[None]), axis=1) < AMBIGUOUS_DEGREES
    ambiguous = ((radius >= NEUTRAL_RADIUS) & (radius < AMBIGUOUS_RADIUS)) | ((radius >= AMBIGUOUS_RADIUS) & edge)
    return np.where(ambiguous | no_face, -1, labels).astype(np.int64)


def write_expression(path: Path, labels: np.ndarray) -> None:
    path.write_text("\n".join([EXPR_HEADER, *map(str, labels)]) + "\n")


def write_latent(path: Path, track: Track) -> None:
    lines = ["frame,valence,arousal,face,speaking"]
    for i, ((v, a), missing, speaking) in enumerate(zip(track.face, track.no_face, track.speaking), start=1):
        lines.append(f"{i},{v:.4f},{a:.4f},{int(not missing)},{int(speaking)}")
    path.write_text("\n".join(lines) + "\n")


def read_latent(root: str | Path, video: str) -> dict[str, np.ndarray]:
    """``latent/<video>.csv`` as columns (frame, valence, arousal, face, speaking), one row per video frame."""
    table = np.loadtxt(Path(root) / "latent" / f"{video}.csv", delimiter=",", skiprows=1, ndmin=2)
    return {name: table[:, j] for j, name in enumerate(["frame", "valence", "arousal", "face", "speaking"])}


# ---------------------------------------------------------------------------------------------
# The release


def recordings(videos: list[DemoVideo]) -> dict[str, list[DemoVideo]]:
    """Video file name -> its annotation files (two for _left/_right), in the split's order."""
    groups: dict[str, list[DemoVideo]] = {}
    for video in videos:
        groups.setdefault(video_file_name(video.name), []).append(video)
    return groups


class _Writer:
    """Writes one split's recordings into the staging folder, collecting the test files' rows."""

    def __init__(self, tmp: Path, spec: RawSpec, rng: np.random.Generator):
        self.tmp, self.spec, self.rng = tmp, spec, rng
        self.scenes: dict[str, tuple[tuple[int, int, int], np.ndarray]] = {}  # recording -> (background, mood)
        self.people: dict[str, Person] = {}
        self.truth: list[str] = []
        self.sample: list[str] = []
        self.index = 0  # of the annotation file within its split
        self.extended = False  # one single-person train video got EXTRA_FRAMES past its annotation's end

    def recording(self, split: str, file_name: str, videos: list[DemoVideo]) -> None:
        rng, fps = self.rng, videos[0].fps
        background, mood = self.scenes.setdefault(videos[0].recording, (
            tuple(int(c) for c in rng.integers(40, 200, size=3)), rng.normal(0, 0.12, size=2)))
        n_labels = int(rng.uniform(self.spec.min_seconds, self.spec.max_seconds) * fps)
        extra = 0
        if split == "train" and len(videos) == 1 and not self.extended:
            extra, self.extended = EXTRA_FRAMES, True
        n_video = n_labels + extra
        tracks = []
        for video in videos:
            person = self.people.setdefault(video.person, new_person(rng))
            tracks.append(new_track(rng, video, split, person, mood, n_labels, n_video, self.index))
            self.index += 1
        words = speech_words(rng, tracks, n_video / fps, fps)
        sound = speech_sound(rng, words, tracks, int(n_video / fps * SAMPLE_RATE), fps)
        images = [track_images(t, background, self.spec.crop_size) for t in tracks]
        for k, (track, crops) in enumerate(zip(tracks, images)):
            track.speaking = speaking_frames(words, k, n_video, fps)
            self.write_track(track, crops, words, fps)
        write_video(self.tmp / "videos" / f"{file_name}.mp4", video_frames(images, background, n_video), sound, fps)

    def write_track(self, track: Track, crops: list[Image.Image | None], words: list[Word], fps: int) -> None:
        name = track.video.name
        write_crops(self.tmp / CROPS_DIR / name, crops)
        write_openface(self.tmp / "openface" / f"{name}.csv", openface_rows(self.rng, track, fps))
        write_transcript(self.tmp / "transcripts" / f"{name}.csv", words)
        write_latent(self.tmp / "latent" / f"{name}.csv", track)
        if track.split == "test":
            truth, sample = ground_truth_rows(name, track.labels)
            self.truth += truth
            self.sample += sample
        else:
            write_labels(self.tmp / LABEL_DIR / SPLIT_DIRS[track.split] / f"{name}.txt", track.labels)
            n_labels = len(track.labels)
            write_expression(self.tmp / EXPR_DIR / SPLIT_DIRS[track.split] / f"{name}.txt",
                             expression_labels(track.shown[:n_labels], track.no_face[:n_labels]))


def generate_raw(root: str | Path, spec: RawSpec = RawSpec()) -> Path:
    """Write the raw fixture to ``root`` atomically (a temporary sibling folder, then a rename)."""
    root = Path(root)
    with staged_folder(root, "raw demo") as tmp:
        label_dirs = [Path(folder) / d for folder in (LABEL_DIR, EXPR_DIR) for d in SPLIT_DIRS.values()]
        for folder in ["videos", "openface", "transcripts", "latent", *label_dirs]:
            (tmp / folder).mkdir(parents=True)
        writer = _Writer(tmp, spec, np.random.default_rng(spec.seed))
        splits = {"train": demo_videos("train", spec.n_train), "val": demo_videos("val", spec.n_val),
                  "test": demo_videos("test", spec.n_test)}
        for split, videos in splits.items():
            writer.index = 0
            for file_name, group in recordings(videos).items():
                writer.recording(split, file_name, group)
        write_test_files(tmp, [v.name for v in splits["test"]], writer.truth, writer.sample)
        (tmp / ".complete").write_text(spec.stamp())
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m abaw.raw_demo",
                                description="Generate the raw demo release (once) and print its folder.")
    p.add_argument("--root", help=f"where (default $ABAW_RAW_DEMO_ROOT, else ~/.cache/abaw/raw-demo-v{VERSION})")
    p.add_argument("--models", help="also write the stand-in backbones (abaw/stand_ins.py) into this folder")
    args = p.parse_args(argv)
    try:
        root = ensure_raw_demo(args.root)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.models:
        from .stand_ins import ensure_stand_ins

        ensure_stand_ins(args.models, demo_words())
    print(root)
    return 0


def demo_words() -> list[str]:
    """Every word the raw demo's transcripts use (the stand-in text model's vocabulary)."""
    return [*POSITIVE_WORDS, *NEGATIVE_WORDS, *FILLER_WORDS]


if __name__ == "__main__":
    sys.exit(main())
