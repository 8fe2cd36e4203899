"""``python -m abaw.extract audio``: the videos' sound -> log-mel, MFCC or a speech model's layer, per frame.

Input: the release's video files in ``--videos DIR`` (searched recursively, so ``batch1/`` and
``batch2/`` may stay as released): ``<video>.mp4``, ``.avi``, ``.mkv`` or ``.mov``. An annotation
``<video>_left`` / ``<video>_right`` (two people of one recording) uses the file ``<video>`` when
there is no file of its own; part numbers (``video45_3``) are separate files and are not stripped.
The sound is decoded with PyAV and resampled to 16 kHz mono.

Frame times. Frame i (1-based) is at t = (i - 0.5) / fps, the middle of the interval its image is
on screen (:func:`abaw.extract.frames.frame_times`, shared with the text extractor), with fps the
video stream's average (else guessed) rate from the container. t counts from the video stream's
first frame; the sound is placed by its own first timestamp, so a track that starts later than the
picture is shifted rather than stretched. Each feature sequence has known times (log-mel and MFCC:
centred 25 ms windows every 10 ms; a speech model: the centre of each output frame's receptive
field, about every 20 ms) and is linearly interpolated at the frame times. A frame whose time lies
outside the sound (an annotation longer than the audio track, or before a late start) is a NaN row;
the report counts them.

Features: ``mel``: 64 log-mel bands in dB (power, 25 ms Hann window, 10 ms hop, 0-8 kHz, reference
1.0, so the absolute level is kept); ``mfcc``: 13 MFCCs (40 mel bands) with deltas and delta-deltas
(9-frame window), 39-d, as the leader-follower system used; ``model``: one hidden layer (default the
last; 0 is the CNN features after the positional convolution) of a local wav2vec 2.0 / HuBERT / WavLM
folder, run over 20 s chunks overlapping by 2 s (each output frame is taken from the chunk where it
has at least 1 s of context each side), so memory stays bounded on long videos. eGeMAPS (openSMILE)
is not offered here.

Errors, all raised before the first video is processed: a missing model folder, annotated videos
without a file (every one listed), a file without a sound track or without a video frame rate.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..subjects import video_file_of
from .frames import (ExtractError, ExtractionReport, FeatureWriter, Target, chunk_spans, extraction_targets,
                     frame_times, require_dir, run_extraction, torch_device)

KINDS = ("mel", "mfcc", "model")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mkv", ".mov")
SAMPLE_RATE = 16000
WIN_LENGTH = 400  # 25 ms
HOP_LENGTH = 160  # 10 ms: features at 100 Hz
N_FFT = 512
N_MELS = 64
N_MFCC = 13
MFCC_MELS = 40
DELTA_WIDTH = 9
CHUNK_SECONDS = 20.0
CONTEXT_SECONDS = 1.0  # each side: chunks overlap by twice this


@dataclass(frozen=True)
class Sound:
    """A file's sound at 16 kHz mono; ``start``: seconds from the video's first frame to sample 0."""

    path: Path
    samples: np.ndarray  # float32 (n,)
    start: float
    fps: float

    @property
    def duration(self) -> float:
        return len(self.samples) / SAMPLE_RATE


@dataclass(frozen=True)
class Sequence:
    """Features on the sound's own timeline: ``values[k]`` at ``times[k]`` seconds after sample 0."""

    times: np.ndarray  # (T,)
    values: np.ndarray  # (T, D)


# ---------------------------------------------------------------------------------------------
# Files


def index_videos(folder: Path) -> dict[str, list[Path]]:
    """Stem -> the video files under ``folder`` (recursive) with that stem."""
    index: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file():
            index.setdefault(path.stem, []).append(path)
    return index


def video_files(targets: list[Target], folder: Path) -> dict[str, Path]:
    """Video -> its file: ``<video>.*`` if present, else ``<base video>.*``; every missing or ambiguous one raised."""
    index = index_videos(folder)
    files, problems = {}, []
    for target in targets:
        names = dict.fromkeys([target.video, video_file_of(target.video)])
        found = next((index[name] for name in names if name in index), None)
        if found is None:
            problems.append(f"{target.video} ({' or '.join(names)} with {'/'.join(VIDEO_SUFFIXES)})")
        elif len(found) > 1:
            problems.append(f"{target.video}: several files, keep one: {', '.join(map(str, found))}")
        else:
            files[target.video] = found[0]
    if problems:
        raise ExtractError(f"{folder}: no usable video file for {len(problems)} annotated video(s):\n  "
                           + "\n  ".join(problems))
    return files


def _streams(container, path: Path):
    audio = container.streams.best("audio")
    video = container.streams.best("video")
    if audio is None:
        raise ExtractError(f"{path}: no audio stream (a video without sound cannot give audio features)")
    rate = video and (video.average_rate or video.guessed_rate)
    if not rate:
        raise ExtractError(f"{path}: no video stream with a frame rate; the frame times need it")
    return audio, video, float(rate)


def probe(path: Path) -> float:
    """The file's frame rate; raises if it has no sound track or no video frame rate (nothing is decoded)."""
    import av

    try:
        with av.open(str(path)) as container:
            return _streams(container, path)[2]
    except av.error.FFmpegError as exc:
        raise ExtractError(f"{path}: cannot open: {exc}") from exc


def check_files(files: dict[str, Path]) -> None:
    """Probe every file once, raising every problem together (before minutes of decoding)."""
    problems = []
    for path in sorted(set(files.values())):
        try:
            probe(path)
        except ExtractError as exc:
            problems.append(str(exc))
    if problems:
        raise ExtractError(f"{len(problems)} video file(s) cannot give audio features:\n  " + "\n  ".join(problems))


def read_sound(path: Path) -> Sound:
    """Decode the file's first audio stream to 16 kHz mono float32, with its start on the video's timeline."""
    import av

    try:
        with av.open(str(path)) as container:
            audio, video, fps = _streams(container, path)
            resampler = av.AudioResampler(format="fltp", layout="mono", rate=SAMPLE_RATE)
            pieces, first = [], None
            for frame in container.decode(audio):
                if first is None:
                    first = frame.time
                pieces += [f.to_ndarray()[0] for f in resampler.resample(frame)]
            pieces += [f.to_ndarray()[0] for f in resampler.resample(None)]
            video_start = float(video.start_time * video.time_base) if video.start_time is not None else 0.0
    except av.error.FFmpegError as exc:
        raise ExtractError(f"{path}: cannot decode the sound: {exc}") from exc
    samples = np.concatenate(pieces).astype(np.float32) if pieces else np.zeros(0, np.float32)
    if samples.size == 0:
        raise ExtractError(f"{path}: the audio stream holds no samples")
    return Sound(path, samples, (first or 0.0) - video_start, fps)


# ---------------------------------------------------------------------------------------------
# Features on the sound's timeline


def spectral_times(n: int) -> np.ndarray:
    """Centres of librosa's ``center=True`` frames: frame k at k hops."""
    return np.arange(n) * HOP_LENGTH / SAMPLE_RATE


def log_mel(sound: Sound) -> Sequence:
    """64 log-mel bands in dB (reference power 1.0: silence stays low, loudness is kept), 100 Hz."""
    import librosa

    mel = librosa.feature.melspectrogram(y=sound.samples, sr=SAMPLE_RATE, n_fft=N_FFT, win_length=WIN_LENGTH,
                                         hop_length=HOP_LENGTH, n_mels=N_MELS, fmax=SAMPLE_RATE / 2)
    values = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None).T
    return Sequence(spectral_times(len(values)), values.astype(np.float32))


def mfcc(sound: Sound) -> Sequence:
    """13 MFCCs + deltas + delta-deltas (39-d), 100 Hz."""
    import librosa

    coefficients = librosa.feature.mfcc(y=sound.samples, sr=SAMPLE_RATE, n_mfcc=N_MFCC, n_fft=N_FFT,
                                        win_length=WIN_LENGTH, hop_length=HOP_LENGTH, n_mels=MFCC_MELS)
    deltas = [librosa.feature.delta(coefficients, width=DELTA_WIDTH, order=k, mode="nearest") for k in (1, 2)]
    values = np.concatenate([coefficients, *deltas]).T
    return Sequence(spectral_times(len(values)), values.astype(np.float32))


class SpeechModel:
    """A local wav2vec 2.0 / HuBERT / WavLM folder: the sound -> one hidden layer at ~50 Hz."""

    def __init__(self, model_dir: str | Path, layer: int | None = None, device: str = "auto", batch_size: int = 64,
                 chunk_seconds: float = CHUNK_SECONDS, context_seconds: float = CONTEXT_SECONDS):
        self.folder = require_dir(model_dir, "speech model")
        self.extractor, self.model = _load_speech_model(self.folder)
        self.layer = _check_layer(layer, self.model.config.num_hidden_layers, self.folder)
        self.stride, self.field = _receptive_field(self.model.config, self.folder)
        self.device, self.autocast = torch_device(device)
        self.model.to(self.device).eval()
        # Batching long chunks gains nothing on the CPU (each matmul already uses every core) and costs memory.
        self.batch_size = max(1, batch_size) if self.device.type == "cuda" else 1
        self.chunk = int(chunk_seconds * SAMPLE_RATE)
        self.overlap = int(2 * context_seconds * SAMPLE_RATE)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def __call__(self, sound: Sound) -> Sequence:
        inputs = self.extractor(sound.samples, sampling_rate=SAMPLE_RATE, return_tensors="np").input_values[0]
        spans = [s for s in chunk_spans(len(inputs), self.chunk, self.overlap) if s.stop - s.start >= self.field]
        times, values = [], []
        for i in range(0, len(spans), self.batch_size):
            batch = spans[i:i + self.batch_size]
            for span, states in zip(batch, self._forward(np.stack([inputs[s.start:s.stop] for s in batch]))):
                centres = span.start + np.arange(len(states)) * self.stride + (self.field - 1) / 2
                keep = (centres >= span.keep_start) & (centres < span.keep_stop)
                times.append(centres[keep] / SAMPLE_RATE)
                values.append(states[keep])
        if not times:  # a sound shorter than one receptive field (25 ms)
            return Sequence(np.zeros(0), np.zeros((0, self.dim), np.float32))
        return Sequence(np.concatenate(times), np.concatenate(values))

    def _forward(self, chunks: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode(), self.autocast:
            out = self.model(torch.from_numpy(chunks).to(self.device), output_hidden_states=True)
        return out.hidden_states[self.layer].float().cpu().numpy()


def _load_speech_model(folder: Path):
    from transformers import AutoFeatureExtractor, AutoModel

    try:
        extractor = AutoFeatureExtractor.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ExtractError(f"{folder}: cannot load a speech model and its feature extractor: {exc}") from exc
    rate = getattr(extractor, "sampling_rate", SAMPLE_RATE)
    if rate != SAMPLE_RATE:
        raise ExtractError(f"{folder}: the model expects {rate} Hz audio; only {SAMPLE_RATE} Hz models are supported")
    return extractor, model


def _check_layer(layer: int | None, n_layers: int, folder: Path) -> int:
    """Index into ``hidden_states`` (0 = input of the transformer, n_layers = its output)."""
    if layer is None:
        return n_layers
    if not 0 <= layer <= n_layers:
        raise ExtractError(f"{folder}: --layer {layer} out of range; the model has hidden layers 0..{n_layers}")
    return layer


def _receptive_field(config, folder: Path) -> tuple[int, int]:
    """(stride, receptive field) in samples of the model's convolutional feature encoder."""
    kernels, strides = getattr(config, "conv_kernel", None), getattr(config, "conv_stride", None)
    if not kernels or not strides:
        raise ExtractError(f"{folder}: not a wav2vec 2.0-style model (its config has no conv_kernel/conv_stride)")
    field, jump = 1, 1
    for kernel, stride in zip(kernels, strides):
        field += (kernel - 1) * jump
        jump *= stride
    return jump, field


# ---------------------------------------------------------------------------------------------
# Per frame


def sample_at(sequence: Sequence, times: np.ndarray, duration: float) -> np.ndarray:
    """(len(times), D): the sequence linearly interpolated at ``times``; NaN outside ``[0, duration]``."""
    t, values = sequence.times, sequence.values
    out = np.full((len(times), values.shape[1]), np.nan, np.float32)
    inside = (times >= 0) & (times <= duration)
    if len(t) == 0 or not inside.any():
        return out
    if len(t) == 1:
        out[inside] = values[0]
        return out
    query = times[inside]
    left = np.clip(np.searchsorted(t, query, side="right") - 1, 0, len(t) - 2)
    weight = np.clip((query - t[left]) / (t[left + 1] - t[left]), 0.0, 1.0)[:, None]
    out[inside] = values[left] * (1 - weight) + values[left + 1] * weight
    return out


def frame_features(sound: Sound, sequence: Sequence, n_frames: int) -> np.ndarray:
    """(n_frames, D): the sequence at each frame's time, NaN rows for frames outside the sound."""
    return sample_at(sequence, frame_times(n_frames, sound.fps) - sound.start, sound.duration)


def _featurizer(kind: str, model_dir, layer, device, batch_size) -> Callable[[Sound], Sequence]:
    if kind == "mel":
        return log_mel
    if kind == "mfcc":
        return mfcc
    return SpeechModel(model_dir, layer=layer, device=device, batch_size=batch_size)


def extract_audio(data_root, videos_dir, kind: str, model_dir=None, layer: int | None = None, batch_size: int = 64,
                  device: str = "auto", name: str = "audio", dtype: str = "float16", test_list=None,
                  test_sample=None) -> ExtractionReport:
    """Write ``ROOT/features/<name>/<video>.npy`` for every annotated video: ``kind`` features per frame.

    Every input problem is raised before the first video is processed (see the module docstring)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "model" and model_dir is None:
        raise ValueError("kind 'model' needs a model folder (--model DIR)")
    if kind != "model" and layer is not None:
        raise ValueError(f"--layer picks a layer of a speech model (--model DIR); --{kind} has none")
    if kind == "model":
        require_dir(model_dir, "speech model")
    folder = require_dir(videos_dir, "videos")
    targets = extraction_targets(data_root, test_list, test_sample)
    writer = FeatureWriter(data_root, name, dtype)
    pending = [t for t in targets if not writer.done(t)]
    files = video_files(pending, folder)
    check_files(files)
    featurize = _featurizer(kind, model_dir, layer, device, batch_size) if pending else None
    cache: dict[Path, tuple[Sound, Sequence]] = {}  # the last file: _left and _right share it

    def extract(target: Target) -> np.ndarray:
        path = files[target.video]
        if path not in cache:
            cache.clear()
            sound = read_sound(path)
            cache[path] = sound, featurize(sound)
        return frame_features(*cache[path], target.n_frames)

    ordered = sorted(targets, key=lambda t: (str(files.get(t.video, "")), t.video))  # a file's videos together
    settings = {"command": "audio", "kind": kind, "model": Path(model_dir).name if model_dir else None,
                "layer": layer}
    return run_extraction(ordered, writer, extract, f"audio ({kind})", settings=settings)

