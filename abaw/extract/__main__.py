"""``python -m abaw.extract {visual,audio,text,import}``: the release -> ``ROOT/features/<name>/<video>.npy``.

Each subcommand parses its arguments here and calls one function of its module; the work lives there.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _common(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--data-root", required=True, help="Aff-Wild2 root (annotation files, test list and sample)")
    p.add_argument("--name", default=name, help=f"feature folder to write: ROOT/features/NAME (default {name})")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored dtype (default float16)")
    p.add_argument("--test-list", help="test video list (default: found at the data root)")
    p.add_argument("--test-sample", help="test sample file (default: found at the data root)")


def _torch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: CUDA with bf16 if present)")
    p.add_argument("--batch-size", type=int, default=64, help="frames (or windows) per forward pass")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m abaw.extract",
                                description="Per-frame features from the Aff-Wild2 release, one row per annotation "
                                            "frame, NaN rows where a frame has no input; resumable.")
    sub = p.add_subparsers(dest="command", required=True)

    visual = sub.add_parser("visual", help="face crops -> a timm backbone's features (local weights)")
    _common(visual, "visual")
    _torch_options(visual)
    visual.add_argument("--backbone", required=True, help="timm model name, e.g. vit_base_patch16_224.mae")
    visual.add_argument("--weights", required=True, help="local checkpoint file (timm, Hugging Face, or abaw.pretrain)")
    visual.add_argument("--frames", help="face crops folder (default ROOT/cropped_aligned)")
    visual.add_argument("--pool", default="cls", choices=["cls", "mean", "avg"],
                        help="cls: CLS token after the final norm; mean: mean of patch tokens; avg: the model's "
                             "pooled output (default cls)")
    visual.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding JPEGs (default 2)")

    audio = sub.add_parser("audio", help="the videos' sound -> log-mel, MFCC or a speech model's layer")
    _common(audio, "audio")
    _torch_options(audio)
    audio.add_argument("--videos", required=True, help="folder of the release's video files (.mp4 / .avi)")
    kind = audio.add_mutually_exclusive_group(required=True)
    kind.add_argument("--mel", action="store_true", help="log-mel spectrogram (librosa)")
    kind.add_argument("--mfcc", action="store_true", help="MFCC with deltas (librosa)")
    kind.add_argument("--model", help="local folder of a wav2vec 2.0 / HuBERT / WavLM model (transformers)")
    audio.add_argument("--layer", type=int, help="hidden layer of --model (default: the last)")

    text = sub.add_parser("text", help="timed words -> a text model's embeddings")
    _common(text, "text")
    _torch_options(text)
    text.add_argument("--transcripts", required=True, help="folder of <video>.csv with word,start,end (seconds)")
    text.add_argument("--model", required=True, help="local folder of a transformers text model")

    importer = sub.add_parser("import", help="per-frame CSV files (OpenFace, py-feat, ...) keyed by a frame column")
    _common(importer, "imported")
    importer.add_argument("--csv", required=True, help="folder of <video>.csv files")
    importer.add_argument("--frame-column", required=True, help="column holding the 1-based frame number")
    importer.add_argument("--columns", help="comma-separated feature columns (default: every numeric column "
                                            "but the frame column)")
    return p


def _run(args: argparse.Namespace):
    common = dict(name=args.name, dtype=args.dtype, test_list=args.test_list, test_sample=args.test_sample)
    if args.command == "visual":
        from .visual import extract_visual

        return extract_visual(args.data_root, args.backbone, args.weights, frames_dir=args.frames, pool=args.pool,
                              batch_size=args.batch_size, workers=args.workers, device=args.device, **common)
    if args.command == "audio":
        from .audio import extract_audio

        kind = "mel" if args.mel else "mfcc" if args.mfcc else "model"
        return extract_audio(args.data_root, args.videos, kind, model_dir=args.model, layer=args.layer,
                             batch_size=args.batch_size, device=args.device, **common)
    if args.command == "text":
        from .text import extract_text

        return extract_text(args.data_root, args.transcripts, args.model, batch_size=args.batch_size,
                            device=args.device, **common)
    from .importer import import_csv

    columns = [c.strip() for c in args.columns.split(",")] if args.columns else None
    return import_csv(args.data_root, args.csv, args.frame_column, columns=columns, **common)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from local files, never a hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from rich.markup import escape

    from ..console import console, interrupted, sigterm_raises
    from ..data import DataError
    from ..io import explain_os_error
    from .frames import ExtractError, FeatureWriter, check_modality, print_report

    args = parser().parse_args(argv)
    writer = FeatureWriter(args.data_root, args.name, args.dtype)
    try:
        with sigterm_raises():
            report = _run(args)
    except (ExtractError, DataError, FileNotFoundError, ValueError) as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}")
        return 1
    except OSError as exc:  # a full disk: the video being written is absent, the finished ones stay
        console.print(f"[bold red]error:[/] {escape(explain_os_error(exc))}")
        return 1
    except KeyboardInterrupt as exc:  # each video is written atomically: the finished ones are whole
        return interrupted(exc, f"the videos already written are kept in {writer.folder}; rerun the same "
                                f"command to extract the rest")
    print_report(report, writer)
    return 0 if check_modality(writer.root, args.name, args.test_list, args.test_sample) else 1


if __name__ == "__main__":
    sys.exit(main())
