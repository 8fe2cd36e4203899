"""Fine-tuning an encoder on Aff-Wild2's expression labels (8 classes), keeping the best epoch's encoder.

    python -m abaw.pretrain expr --data-root ROOT --init runs/mae/encoder.pth --out runs/expr [--frames DIR]

* Labels: ``ROOT/EXPR_Recognition_Challenge/{Train_Set,Validation_Set}/<video>.txt``, a header line
  ``Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other`` then one class index (0-7) per frame,
  ``-1`` for a frame without a label; frame i is line i + 1 and its image
  ``ROOT/cropped_aligned/<video>/<i:05d>.jpg`` (or ``--frames DIR``). Frames without an image, and
  without a label, are skipped; a line that is not an integer in -1..7 is an error naming file:line.
  ``--frame-step K`` keeps every K-th labelled frame (neighbouring frames are near duplicates).
* Model: the timm encoder (``--init`` weights, e.g. MAE's ``encoder.pth``) and a linear head on the
  mean of its patch tokens after the final norm (``--pool mean``, MAE fine-tuning's global pool) or
  on its class token (``--pool cls``).
* Loss: cross-entropy weighted by inverse class frequency in the training frames (mean weight 1 over
  the classes present), label smoothing 0.1. AdamW (betas 0.9, 0.999, weight decay 0.05) with
  layer-wise learning-rate decay as in MAE's fine-tuning (the head and final norm at the base rate,
  block i at ``decay ** (depth - i)``, patch and position embeddings at ``decay ** (depth + 1)``,
  default 0.65), warm-up then cosine decay per step; bf16 autocast on CUDA. Random horizontal flips.
* Each epoch: macro-F1 over the 8 classes on the validation frames (the challenge's measure); the best
  epoch's encoder is kept in ``best.pt`` and written as ``encoder.pth`` (encoder only, timm key names,
  no head). ``history.csv`` has loss and F1 per epoch, next to the F1 of always predicting the most
  frequent training class. ``last.pt`` after each epoch makes a rerun resume after the last finished one.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..checkpoint import load_checkpoint
from ..console import console
from ..data import CROPS_DIR, SPLIT_DIRS
from ..io import TextDecodeError, atomic_torch_save, atomic_write_text, text_lines
from .common import (Images, Normalise, PretrainError, batch_loader, check_resume, create_encoder, data_config,
                     epoch_batches, load_init, progress, random_flip, read_resume_point, restore_rng, rng_state,
                     save_encoder, warmup_cosine)

EXPR_DIR = "EXPR_Recognition_Challenge"
EXPR_CLASSES = ("Neutral", "Anger", "Disgust", "Fear", "Happiness", "Sadness", "Surprise", "Other")
NO_EXPR = -1


def parse_expr_file(path: str | Path) -> np.ndarray:
    """One expression file -> (n_frames,) int labels, -1 where there is none; errors name file:line."""
    path = Path(path)
    try:
        lines = text_lines(path)
    except TextDecodeError as exc:
        raise PretrainError(str(exc)) from None
    if not lines:
        raise PretrainError(f"{path}:1: empty file, expected the header {','.join(EXPR_CLASSES)}")
    header = [c.strip().lower() for c in lines[0].split(",")]
    if header != [c.lower() for c in EXPR_CLASSES]:
        raise PretrainError(f"{path}:1: expected the header {','.join(EXPR_CLASSES)}, got {lines[0]!r}")
    labels = np.empty(len(lines) - 1, np.int64)
    for number, line in enumerate(lines[1:], start=2):
        try:
            value = int(line.strip())
        except ValueError:
            raise PretrainError(f"{path}:{number}: expected a class index -1..7, got {line!r}") from None
        if not NO_EXPR <= value < len(EXPR_CLASSES):
            raise PretrainError(f"{path}:{number}: class index {value} is outside -1..7")
        labels[number - 2] = value
    return labels


def expr_frames(root: Path, split: str, frames_dir: Path, frame_step: int = 1) -> tuple[list[Path], np.ndarray]:
    """(image paths, labels) of the labelled frames with an image in one split."""
    folder = root / EXPR_DIR / SPLIT_DIRS[split]
    if not folder.is_dir():
        raise PretrainError(f"{folder}: no expression labels for the {split} split (expected <video>.txt files)")
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise PretrainError(f"{folder}: no <video>.txt expression files in it")
    paths, labels = [], []
    for file in files:
        video_labels = parse_expr_file(file)
        crops = frames_dir / file.stem
        if not crops.is_dir():
            continue
        images = {p.stem: p for p in crops.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
        labelled = np.flatnonzero(video_labels >= 0)[::frame_step]
        for index in labelled:
            image = images.get(f"{index + 1:05d}")
            if image is not None:
                paths.append(image)
                labels.append(int(video_labels[index]))
    if not paths:
        raise PretrainError(f"{folder}: no labelled frame has an image in {frames_dir}")
    return paths, np.asarray(labels, np.int64)


def macro_f1(truth: np.ndarray, predicted: np.ndarray, n_classes: int = len(EXPR_CLASSES)) -> float:
    """The mean over all ``n_classes`` of each class's F1 (0 for a class never predicted nor present)."""
    scores = []
    for c in range(n_classes):
        tp = np.sum((predicted == c) & (truth == c))
        denominator = np.sum(predicted == c) + np.sum(truth == c)
        scores.append(2 * tp / denominator if denominator else 0.0)
    return float(np.mean(scores))


def class_weights(labels: np.ndarray, n_classes: int = len(EXPR_CLASSES)) -> np.ndarray:
    """Inverse class frequency, mean 1 over the classes present; 0 for an absent class (never used)."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, 1.0 / np.maximum(counts, 1), 0.0)
    return weights * (counts > 0).sum() / weights.sum()


def layer_id(name: str, depth: int) -> int:
    """0: embeddings and tokens; i + 1: block i; depth + 1: the final norm and the head."""
    if name.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed", "norm_pre")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def lrd_param_groups(encoder, head, lr: float, weight_decay: float, decay: float) -> list[dict]:
    """AdamW groups with layer-wise rate decay (``lr * decay ** (depth + 1 - layer)``), no weight decay
    on biases, norms, tokens and position embeddings."""
    depth = len(encoder.blocks) if hasattr(encoder, "blocks") else 0
    groups: dict[tuple[int, bool], dict] = {}
    named = [(n, p) for n, p in encoder.named_parameters()] + [(f"head.{n}", p) for n, p in head.named_parameters()]
    for name, param in named:
        if not param.requires_grad:
            continue
        layer = layer_id(name, depth)
        no_decay = param.ndim < 2 or name.endswith(("cls_token", "reg_token", "pos_embed"))
        group = groups.setdefault((layer, no_decay), {
            "params": [], "weight_decay": 0.0 if no_decay else weight_decay,
            "lr": lr * decay ** (depth + 1 - layer), "layer": layer})
        group["params"].append(param)
    return [groups[k] for k in sorted(groups)]


@dataclass
class ExprOptions:
    data_root: str
    out: str
    init: str | None = None
    backbone: str = "vit_base_patch16_224"
    frames: str | None = None
    epochs: int = 10
    max_epochs: int | None = None  # stop (resumably) after this many epochs in total
    batch_size: int = 64
    blr: float = 5e-4  # MAE fine-tuning's base rate; lr = blr * batch / 256
    lr: float | None = None
    layer_decay: float = 0.65
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    frame_step: int = 1
    pool: str = "mean"
    seed: int = 0
    workers: int = 2
    device: str = "auto"


@dataclass
class ExprResult:
    out: Path
    epoch: int
    best_epoch: int
    best_f1: float
    constant_f1: float  # always the most frequent training class
    history: list[dict] = field(default_factory=list)
    complete: bool = False


def finetune_expr(options: ExprOptions) -> ExprResult:
    import torch

    from ..extract.frames import torch_device

    o = options
    for name in ("batch_size", "epochs", "frame_step"):
        if getattr(o, name) < 1:
            raise PretrainError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(o, name)}")
    root, out = Path(o.data_root), Path(o.out)
    frames_dir = Path(o.frames) if o.frames else root / CROPS_DIR
    if not frames_dir.is_dir():
        raise PretrainError(f"{frames_dir}: face crops folder (--frames) not found")
    train_paths, train_labels = expr_frames(root, "train", frames_dir, o.frame_step)
    val_paths, val_labels = expr_frames(root, "val", frames_dir, o.frame_step)
    device, autocast = torch_device(o.device)
    torch.manual_seed(o.seed)
    encoder = create_encoder(o.backbone)
    config = data_config(encoder)
    size, interpolation = config["input_size"][1:], config.get("interpolation", "bicubic")
    train_set = Images(train_paths, size, interpolation, train_labels)
    val_set = Images(val_paths, size, interpolation, val_labels)
    per_epoch = len(epoch_batches(len(train_paths), o.batch_size, o.seed, 0))
    total = o.epochs * per_epoch
    lr = o.lr if o.lr is not None else o.blr * o.batch_size / 256
    settings = {"backbone": o.backbone, "train_frames": len(train_paths), "val_frames": len(val_paths),
                "batch_size": o.batch_size, "epochs": o.epochs, "lr": lr, "layer_decay": o.layer_decay,
                "seed": o.seed}
    saved = read_resume_point(out, device, "expr")
    resume = saved is not None
    if o.init and not resume:
        load_init(encoder, o.init, o.backbone)
    head = torch.nn.Linear(encoder.num_features, len(EXPR_CLASSES))
    torch.nn.init.trunc_normal_(head.weight, std=2e-5)  # MAE fine-tuning's head init
    torch.nn.init.zeros_(head.bias)
    model = Classifier(encoder, head, o.pool).to(device)
    optimizer = torch.optim.AdamW(lrd_param_groups(encoder, head, lr, o.weight_decay, o.layer_decay),
                                  lr=lr, betas=(0.9, 0.999))
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(max(1, round(o.warmup_epochs * per_epoch)), total))
    weights = torch.tensor(class_weights(train_labels), dtype=torch.float32, device=device)
    criterion = torch.nn.CrossEntropyLoss(weight=weights, label_smoothing=o.label_smoothing)
    majority = int(np.bincount(train_labels, minlength=len(EXPR_CLASSES)).argmax())
    constant = macro_f1(val_labels, np.full_like(val_labels, majority))

    epoch, history, best_epoch, best_f1 = 0, [], 0, -1.0
    if resume:
        check_resume(saved["settings"], settings, out)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        restore_rng(saved, device)
        epoch, history, best_epoch, best_f1 = saved["epoch"], saved["history"], saved["best_epoch"], saved["best_f1"]
        console.print(f"expr: resuming {out} after epoch {epoch} of {o.epochs}", markup=False)
    else:
        console.print(f"expr: {o.backbone} on {len(train_paths)} train / {len(val_paths)} validation frames, "
                      f"{o.epochs} epochs of {per_epoch} steps, lr {lr:.2e}, layer decay {o.layer_decay}, "
                      f"device {device}; always '{EXPR_CLASSES[majority]}' scores macro-F1 {constant:.4f}",
                      markup=False)
    normalise = Normalise(config, device)
    stop = o.epochs if o.max_epochs is None else min(o.epochs, o.max_epochs)
    with progress() as bar:
        task = bar.add_task("expr", total=total, completed=epoch * per_epoch, info="")
        while epoch < stop:
            model.train()
            losses = []
            start = time.perf_counter()
            for images, labels in batch_loader(train_set, epoch_batches(len(train_paths), o.batch_size, o.seed,
                                                                        epoch), o.workers, device):
                with autocast:
                    logits = model(normalise(random_flip(images)))
                loss = criterion(logits.float(), labels.to(device))
                if not torch.isfinite(loss):
                    raise PretrainError(f"expr: the loss is {loss.item()} in epoch {epoch + 1}; lower --blr/--lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                rate = len(losses) * o.batch_size / max(time.perf_counter() - start, 1e-9)
                bar.update(task, advance=1, info=f"epoch {epoch + 1} loss {losses[-1]:.4f}, {rate:,.0f} img/s")
            epoch += 1
            predicted = predict(model, val_set, o.batch_size, o.workers, normalise, autocast, device)
            f1 = macro_f1(val_labels, predicted)
            history.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_macro_f1": f1,
                            "constant_macro_f1": constant})
            if f1 > best_f1:
                best_epoch, best_f1 = epoch, f1
                atomic_torch_save(out / "best.pt", {"encoder": {k: v.detach().cpu() for k, v in
                                                                encoder.state_dict().items()},
                                                    "head": head.state_dict(), "epoch": epoch, "val_macro_f1": f1})
            atomic_torch_save(out / "last.pt", {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                                "scheduler": scheduler.state_dict(), "epoch": epoch,
                                                "history": history, "best_epoch": best_epoch, "best_f1": best_f1,
                                                "settings": settings, "options": asdict(o), **rng_state(device)})
            atomic_write_text(out / "history.csv", "epoch,train_loss,val_macro_f1,constant_macro_f1\n" + "".join(
                f"{h['epoch']},{h['train_loss']:.6f},{h['val_macro_f1']:.6f},{h['constant_macro_f1']:.6f}\n"
                for h in history))
            console.print(f"expr: epoch {epoch}/{o.epochs} loss {np.mean(losses):.4f} validation macro-F1 {f1:.4f}"
                          f" (best {best_f1:.4f}, epoch {best_epoch}; constant {constant:.4f})", markup=False)
    best = load_checkpoint(out / "best.pt", "cpu")
    encoder_cpu = create_encoder(o.backbone)
    encoder_cpu.load_state_dict(best["encoder"])
    save_encoder(out / "encoder.pth", encoder_cpu)
    complete = epoch >= o.epochs
    console.print(f"expr: {'done' if complete else 'stopped'} after epoch {epoch} of {o.epochs}; best epoch "
                  f"{best_epoch} (macro-F1 {best_f1:.4f}); encoder weights in {out / 'encoder.pth'}", markup=False)
    return ExprResult(out, epoch, best_epoch, best_f1, constant, history, complete)


def Classifier(encoder, head, pool: str):
    """encoder + head on the pooled tokens: ``mean`` of the patch tokens after the final norm (MAE
    fine-tuning's global pool), or ``cls``, the class token (``abaw.extract visual``'s default)."""
    import torch

    if pool not in ("mean", "cls"):
        raise PretrainError(f"--pool must be mean or cls, got {pool!r}")
    if pool == "cls" and getattr(encoder, "cls_token", None) is None:
        raise PretrainError("--pool cls: the backbone has no class token; use --pool mean")

    class _Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder, self.head = encoder, head
            self.prefix = getattr(encoder, "num_prefix_tokens", 0)

        def forward(self, x):
            tokens = self.encoder.forward_features(x)
            pooled = tokens[:, 0] if pool == "cls" else tokens[:, self.prefix:].mean(dim=1)
            return self.head(pooled)

    return _Classifier()


def predict(model, dataset, batch_size: int, workers: int, normalise, autocast, device) -> np.ndarray:
    import torch

    model.eval()
    order = np.arange(len(dataset))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    out = []
    with torch.inference_mode():
        for images, _ in batch_loader(dataset, batches, workers, device):
            with autocast:
                out.append(model(normalise(images)).float().argmax(dim=1).cpu().numpy())
    return np.concatenate(out)
