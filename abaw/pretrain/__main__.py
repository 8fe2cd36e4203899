"""``python -m abaw.pretrain {mae,expr}``: a visual encoder for ``python -m abaw.extract visual --weights``.

    python -m abaw.pretrain mae  --images DIR [DIR ...] --backbone vit_base_patch16_224 --out runs/mae [--init FILE]
    python -m abaw.pretrain expr --data-root ROOT --init runs/mae/encoder.pth --out runs/expr [--frames DIR]

Each writes ``OUT/encoder.pth`` (timm key names) and resumes from ``OUT/last.pt`` when rerun.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m abaw.pretrain",
                                description="Pretrain a timm ViT for abaw.extract visual: masked autoencoding on "
                                            "face images, then expression fine-tuning; resumable.")
    sub = p.add_subparsers(dest="command", required=True)

    mae = sub.add_parser("mae", help="masked-autoencoder pretraining on folders of images (He et al. 2021)")
    mae.add_argument("--images", nargs="+", required=True, help="folders searched recursively for .jpg/.png images")
    mae.add_argument("--backbone", required=True, help="timm ViT name, e.g. vit_base_patch16_224")
    mae.add_argument("--out", required=True, help="run folder: last.pt, history.csv, previews/, encoder.pth")
    mae.add_argument("--init", help="local encoder weights to start from (optional)")
    mae.add_argument("--epochs", type=int, default=100, help="passes over the images (default 100)")
    mae.add_argument("--steps", type=int, help="total optimiser steps (overrides --epochs)")
    mae.add_argument("--max-steps", type=int, help="stop after this many steps in total; a rerun continues")
    mae.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    mae.add_argument("--blr", type=float, default=1.5e-4, help="base rate; lr = blr * batch / 256 (default 1.5e-4)")
    mae.add_argument("--lr", type=float, help="absolute learning rate (overrides --blr)")
    mae.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 5%% of the steps)")
    mae.add_argument("--weight-decay", type=float, default=0.05)
    mae.add_argument("--mask-ratio", type=float, default=0.75)
    mae.add_argument("--save-every", type=int, default=500, help="steps between checkpoints (default 500)")
    mae.add_argument("--preview-every", type=int, default=1000, help="steps between reconstruction PNGs")
    mae.add_argument("--log-every", type=int, default=50, help="steps between log lines when not on a terminal")

    expr = sub.add_parser("expr", help="fine-tune on Aff-Wild2's expression labels (8 classes), best epoch kept")
    expr.add_argument("--data-root", required=True, help="root with EXPR_Recognition_Challenge/ and cropped_aligned/")
    expr.add_argument("--out", required=True, help="run folder: last.pt, best.pt, history.csv, encoder.pth")
    expr.add_argument("--init", help="encoder weights to start from, e.g. runs/mae/encoder.pth")
    expr.add_argument("--backbone", default="vit_base_patch16_224", help="timm name (default vit_base_patch16_224)")
    expr.add_argument("--frames", help="face crops folder (default ROOT/cropped_aligned)")
    expr.add_argument("--epochs", type=int, default=10)
    expr.add_argument("--max-epochs", type=int, help="stop after this many epochs in total; a rerun continues")
    expr.add_argument("--batch-size", type=int, default=64)
    expr.add_argument("--blr", type=float, default=5e-4, help="base rate; lr = blr * batch / 256 (default 5e-4)")
    expr.add_argument("--lr", type=float, help="absolute learning rate of the head (overrides --blr)")
    expr.add_argument("--layer-decay", type=float, default=0.65, help="per-block rate decay (default 0.65)")
    expr.add_argument("--weight-decay", type=float, default=0.05)
    expr.add_argument("--warmup-epochs", type=float, default=1.0)
    expr.add_argument("--label-smoothing", type=float, default=0.1)
    expr.add_argument("--pool", default="mean", choices=["mean", "cls"],
                      help="head input: mean of the patch tokens (default) or the class token")
    expr.add_argument("--frame-step", type=int, default=1, help="keep every K-th labelled frame (default 1)")

    for command in (mae, expr):
        command.add_argument("--seed", type=int, default=0)
        command.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding images")
        command.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (bf16 autocast on CUDA)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = vars(parser().parse_args(argv))
    command = args.pop("command")
    from .common import PretrainError

    try:
        if command == "mae":
            from .mae import MAEOptions, train_mae

            train_mae(MAEOptions(**args))
        else:
            from .expr import ExprOptions, finetune_expr

            finetune_expr(ExprOptions(**args))
    except (PretrainError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
