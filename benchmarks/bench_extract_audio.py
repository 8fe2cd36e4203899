"""Real-time factor of each audio feature on the CPU: seconds of sound processed per second of compute.

    python benchmarks/bench_extract_audio.py                 # 60 s of sound, mel, mfcc and wav2vec2-base
    python benchmarks/bench_extract_audio.py --seconds 20 --skip-model

One synthetic video (32x32 at 25 fps, AAC sound at 44.1 kHz: noise bursts under a gliding tone, so
the spectrum changes) is written once, untimed. Each feature is then timed once, as the extractor
runs it on one video: decode + resample to 16 kHz (PyAV), the features, and their sampling at every
frame time. The speech model is a wav2vec2-base-sized model (``Wav2Vec2Config()``: 12 layers, 768
wide, 95 M parameters) with random weights, saved to a temporary folder and loaded as
``--model`` would load it; its load time is reported apart. A short warm-up call first keeps
one-time costs (librosa's numba compilation) out of the figures.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

from abaw.extract import audio

RATE = 44100
FPS = 25


def synthetic_sound(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    glide = 0.3 * np.sin(2 * np.pi * (200 * t + 40 * t ** 2 / seconds))
    envelope = (np.sin(2 * np.pi * 3 * t) > 0).astype(np.float32)  # syllable-like on/off at 3 Hz
    return (glide + 0.1 * rng.standard_normal(len(t)) * envelope).astype(np.float32)


def write_video(path: Path, sound: np.ndarray) -> Path:
    import av

    with av.open(str(path), "w") as container:
        picture = container.add_stream("mpeg4", rate=FPS, width=32, height=32, pix_fmt="yuv420p")
        track = container.add_stream("aac", rate=RATE, layout="mono")
        for i in range(int(len(sound) / RATE * FPS)):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            frame.pts = i
            container.mux(picture.encode(frame))
        container.mux(picture.encode())
        size = track.codec_context.frame_size
        for offset in range(0, len(sound), size):
            frame = av.AudioFrame.from_ndarray(sound[None, offset:offset + size], format="fltp", layout="mono")
            frame.sample_rate, frame.time_base, frame.pts = RATE, Fraction(1, RATE), offset
            container.mux(track.encode(frame))
        container.mux(track.encode())
    return path


def timed(path: Path, featurize, n_frames: int) -> tuple[float, tuple[int, ...]]:
    start = time.perf_counter()
    sound = audio.read_sound(path)
    rows = audio.frame_features(sound, featurize(sound), n_frames)
    return time.perf_counter() - start, rows.shape


def build_base_model(folder: Path) -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    Wav2Vec2Model(Wav2Vec2Config()).save_pretrained(folder)
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0, help="length of the synthetic sound (default 60)")
    p.add_argument("--skip-model", action="store_true", help="mel and mfcc only")
    args = p.parse_args()
    import torch

    print(f"CPU, {torch.get_num_threads()} torch thread(s); {args.seconds:g} s of sound, {FPS} fps")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = write_video(tmp / "bench.mp4", synthetic_sound(args.seconds))
        warm = write_video(tmp / "warm.mp4", synthetic_sound(1.0))
        n_frames = int(args.seconds * FPS)
        featurizers = {"mel": audio.log_mel, "mfcc": audio.mfcc}
        if not args.skip_model:
            build_base_model(tmp / "wav2vec2-base")
            start = time.perf_counter()
            featurizers["wav2vec2-base (last layer)"] = audio.SpeechModel(tmp / "wav2vec2-base", device="cpu")
            print(f"wav2vec2-base load: {time.perf_counter() - start:.1f} s")
        decode_s = timed(path, lambda sound: audio.Sequence(np.zeros(1), np.zeros((1, 1))), n_frames)[0]
        print(f"{'decode + resample only':28s} {decode_s:7.2f} s   real-time factor {args.seconds / decode_s:8.0f}x")
        for name, featurize in featurizers.items():
            timed(warm, featurize, FPS)
            seconds, shape = timed(path, featurize, n_frames)
            print(f"{name:28s} {seconds:7.2f} s   real-time factor {args.seconds / seconds:8.1f}x   rows {shape}")


if __name__ == "__main__":
    main()
