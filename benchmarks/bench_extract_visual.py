"""Benchmark: ``abaw.extract visual`` on the CPU, ViT-B/16 at 224 (random weights), synthetic 112x112 crops.

    python benchmarks/bench_extract_visual.py                 # 96 frames, --workers 0, 2 threads (~1 min)
    python benchmarks/bench_extract_visual.py --frames 512 --workers 2

One run measures, on the same synthetic JPEG crops (a tiny release: 4 videos, their annotation files,
test list and sample; every frame has a crop):

1. decode: the extractor's own dataset (``FaceCrops``: PIL decode, bicubic resize 112 -> 224, uint8
   tensor) read in this process, one core: ms per frame and frames/s per core;
2. full: ``extract_visual`` end to end (DataLoader decoding with ``--workers``, ViT-B/16 forward with
   the CLS pool, atomic writes): frames/s, as its report counts them;
3. the decoding share: decode time / full time. With ``--workers 0`` the pipeline is serial, so this
   is exactly the share of the wall time spent decoding; with workers, decoding overlaps the forward
   pass and the share is what it costs in CPU time, not what it adds to the wall time.

The weights are random (``pretrained=False``) and saved to a temporary file: nothing is downloaded.
Timings on a shared machine are inflated by other processes; the load average is printed.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BACKBONE = "vit_base_patch16_224"
N_VIDEOS = 4  # two train, one validation, one test video


def synthetic_root(root: Path, frames_per_video: int, seed: int = 0) -> Path:
    """A release in miniature: annotation files, test list and sample, and a 112x112 crop per frame."""
    from PIL import Image

    from abaw.data import LABEL_DIR, SPLIT_DIRS

    rng = np.random.default_rng(seed)
    splits = {"v0": "train", "v1": "train", "v2": "val", "v3": "test"}
    y, x = np.mgrid[0:112, 0:112] / 112
    for video, split in splits.items():
        if split != "test":
            labels = rng.uniform(-1, 1, (frames_per_video, 2)).round(3)
            folder = root / LABEL_DIR / SPLIT_DIRS[split]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{video}.txt").write_text("valence,arousal\n" + "".join(f"{v},{a}\n" for v, a in labels))
        crops = root / "cropped_aligned" / video
        crops.mkdir(parents=True)
        for frame in range(1, frames_per_video + 1):  # face-like content: smooth shapes and sensor noise
            base = np.stack([np.sin(2 * np.pi * (rng.uniform(0.5, 3) * x + rng.uniform(0.5, 3) * y)) for _ in range(3)], -1)
            pixels = np.clip(127 + 90 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(crops / f"{frame:05d}.jpg", quality=90)
    (root / "Valence_Arousal_Estimation_Challenge_test_set_release.txt").write_text("v3\n")
    sample = [f"v3/{i:05d}.jpg,," for i in range(1, frames_per_video + 1)]
    (root / "CVPR_8th_ABAW_VA_test_set_sample.txt").write_text("\n".join(["image_location,valence,arousal", *sample]) + "\n")
    return root


def decode_pass(root: Path, resize: bool = True) -> tuple[int, float, tuple]:
    """Frames and seconds to read every crop through the extractor's dataset, in this process
    (``resize=False``: decode alone, the crops kept at 112x112)."""
    import timm

    from abaw.extract.visual import FaceCrops, resample_filter

    config = timm.data.resolve_model_data_config(timm.create_model(BACKBONE, pretrained=False, num_classes=0))
    paths = sorted((root / "cropped_aligned").glob("*/*.jpg"))
    size = tuple(config["input_size"][1:]) if resize else (112, 112)
    crops = FaceCrops(paths, size, resample_filter(config["interpolation"]))
    crops[0]  # warm-up: imports, PIL plugins
    start = time.perf_counter()
    for i in range(len(crops)):
        image, _, error = crops[i]
        assert not error, error
    return len(crops), time.perf_counter() - start, tuple(image.shape)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=96, help="frames in all (default 96: ViT-B/16 runs at ~2 frames/s "
                                                            "on 2 shared cores)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the full pass (default 0: serial)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args()

    import torch
    import timm

    from abaw.extract.visual import extract_visual

    torch.set_num_threads(args.threads)
    per_video = max(1, args.frames // N_VIDEOS)
    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic_root(Path(tmp) / "root", per_video)
        weights = Path(tmp) / "vit_b16_random.pth"
        torch.save(timm.create_model(BACKBONE, pretrained=False, num_classes=0).state_dict(), weights)

        n_decoded, decode_s, shape = decode_pass(root)
        _, decode_only_s, _ = decode_pass(root, resize=False)
        report = extract_visual(root, BACKBONE, weights, pool="cls", batch_size=args.batch_size,
                                workers=args.workers, device="cpu", name="bench")
        assert report.frames == N_VIDEOS * per_video and not report.unreadable

    decode_per_frame = decode_s / n_decoded
    full_per_frame = report.seconds / report.frames
    print(f"\nmachine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, "
          f"timm {timm.__version__}, {args.threads} torch threads, --workers {args.workers}, "
          f"--batch-size {args.batch_size}")
    print(f"decode (PIL, 112x112 JPEG -> {shape[1]}x{shape[2]} bicubic, uint8; 1 core): "
          f"{decode_per_frame * 1e3:.2f} ms/frame = {1 / decode_per_frame:,.0f} frames/s per core, of which the "
          f"resize {(decode_s - decode_only_s) / n_decoded * 1e3:.2f} ms")
    print(f"full ({BACKBONE}, cls, float32 on the CPU, {report.frames} frames): "
          f"{report.frames_per_second:.1f} frames/s ({full_per_frame * 1e3:.0f} ms/frame)")
    print(f"decoding share: {decode_per_frame / full_per_frame:.1%} of the time per frame "
          f"({'serial pipeline: share of the wall time' if args.workers == 0 else 'CPU time; overlapped by workers'})")


if __name__ == "__main__":
    main()
