"""What the two pretraining stages share: images, the encoder, checkpoints, the schedule, the progress bar.

Both stages write ``OUT/last.pt`` (the resume point: weights, optimizer, scheduler, the torch random
streams, the stage's counters) atomically, so a kill loses at most the work since the last save, and
``OUT/encoder.pth``: the encoder's ``state_dict`` under timm's own key names, which
``python -m abaw.extract visual --backbone <same> --weights OUT/encoder.pth`` loads with no key left over.
last.pt is read back with ``torch.load(weights_only=True)``; a truncated, corrupt or unsafe one is
deleted and the stage starts over, saying so.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..schedules import warmup_cosine  # noqa: F401 - re-exported: the trainers' one schedule

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class PretrainError(Exception):
    """Bad input to a pretraining stage: the message names the folder, file (and line) or option."""


def create_encoder(backbone: str):
    """``timm.create_model(backbone, pretrained=False, num_classes=0)``: random weights, nothing downloaded."""
    import timm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not timm.is_model(backbone):
        raise PretrainError(f"--backbone {backbone!r} is not a timm model name (timm.list_models('vit_*') lists them)")
    try:
        return timm.create_model(backbone, pretrained=False, num_classes=0)
    except RuntimeError as exc:
        raise PretrainError(f"--backbone {backbone!r}: {exc}") from exc


def load_init(encoder, path, backbone: str):
    """``--init FILE``: local encoder weights, loaded as ``abaw.extract visual`` loads them (prefixes
    stripped, another backbone's or another size's checkpoint refused, missing/unexpected keys printed)."""
    from ..extract.frames import ExtractError
    from ..extract.visual import load_weights

    path = Path(path)
    if not path.is_file():
        raise PretrainError(f"{path}: --init checkpoint not found")
    try:
        return load_weights(encoder, path, backbone)
    except ExtractError as exc:
        raise PretrainError(str(exc)) from exc


def data_config(encoder) -> dict:
    import timm

    config = timm.data.resolve_model_data_config(encoder)
    if config["input_size"][0] != 3:
        raise PretrainError(f"the backbone takes {config['input_size'][0]}-channel images; faces are RGB")
    return config


def find_images(folders: Sequence[str | Path]) -> list[Path]:
    """Every .jpg/.jpeg/.png under each folder (recursively, sorted); a folder with none is an error."""
    paths: list[Path] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise PretrainError(f"--images {folder}: not a folder")
        found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not found:
            raise PretrainError(f"--images {folder}: no .jpg/.jpeg/.png images in it or below it")
        paths += found
    return paths


class Images:
    """A map-style dataset: (uint8 (3, H, W) image resized to the model's input size, label)."""

    def __init__(self, paths: list[Path], size: tuple[int, int], interpolation: str, labels=None):
        from ..extract.visual import resample_filter

        self.paths, self.size, self.resample = paths, tuple(size), resample_filter(interpolation)
        self.labels = np.zeros(len(paths), np.int64) if labels is None else np.asarray(labels, np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        from ..extract.visual import UNREADABLE_IMAGE, read_crop

        try:
            return read_crop(self.paths[index], self.size, self.resample), int(self.labels[index])
        except UNREADABLE_IMAGE as exc:
            raise PretrainError(f"{self.paths[index]}: cannot read the image: {exc}") from exc


class Normalise:
    """uint8 images -> the model's normalised float input, on the device."""

    def __init__(self, config: dict, device):
        import torch

        self.mean = torch.tensor(config["mean"], device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(config["std"], device=device).view(1, 3, 1, 1) * 255
        self.device = device

    def __call__(self, images):
        return (images.to(self.device, non_blocking=True).float() - self.mean) / self.std


def random_flip(images):
    """Horizontal flip of a random half of the batch (torch's generator: restored on resume)."""
    import torch

    flip = torch.rand(images.shape[0]) < 0.5
    if flip.any():
        images = images.clone()
        images[flip] = images[flip].flip(-1)
    return images


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The batches of one epoch: a permutation seeded by (seed, epoch), the last partial batch dropped
    (kept when it is the only one). The same on every run, so a resumed run sees the same batches."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    full = n // batch_size
    if full == 0:
        return [order]
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(full)]


def batch_loader(dataset, batches: list[np.ndarray], workers: int, device):
    """A DataLoader over the given batches. It has a generator of its own: a loader draws its workers'
    seed when iterated, and from torch's global stream that draw would make a resumed run diverge."""
    import torch
    from torch.utils.data import DataLoader

    from ..extract.visual import _one_thread

    return DataLoader(dataset, batch_sampler=[b.tolist() for b in batches], num_workers=workers,
                      worker_init_fn=_one_thread if workers else None, pin_memory=device.type == "cuda",
                      generator=torch.Generator().manual_seed(0))


def rng_state(device) -> dict:
    import torch

    state = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(saved: dict, device) -> None:
    import torch

    torch.set_rng_state(saved["rng"].cpu())
    if device.type == "cuda" and "cuda_rng" in saved:
        torch.cuda.set_rng_state(saved["cuda_rng"].cpu(), device)


def read_resume_point(out: Path, device, stage: str) -> dict | None:
    """``OUT/last.pt``, or None when there is none or it cannot be loaded safely (truncated, corrupt, or
    needing more than tensors and plain values): then it is deleted and the stage starts over, saying so."""
    from ..checkpoint import CheckpointError, describe, load_checkpoint
    from ..console import console

    path = out / "last.pt"
    if not path.exists():
        return None
    try:
        return load_checkpoint(path, device)
    except CheckpointError as exc:
        path.unlink()
        console.print(f"{stage}: {path} is {describe(exc)}: starting again from the beginning", markup=False)
        return None


def check_resume(saved: dict, settings: dict, out: Path) -> None:
    """A rerun must ask for the run it resumes: the settings that shape it are compared."""
    differ = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
    if differ:
        shown = ", ".join(f"{k}: {a!r} in last.pt vs {b!r} now" for k, (a, b) in differ.items())
        raise PretrainError(f"{out}/last.pt was made with other settings ({shown}); use another --out or the same "
                            f"options, or delete last.pt to start over")


def save_encoder(path: Path, encoder) -> None:
    """The encoder's state_dict, timm key names, CPU tensors, written atomically."""
    from ..io import atomic_torch_save

    atomic_torch_save(path, {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()})


def progress():
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from ..console import console

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not console.is_terminal)
