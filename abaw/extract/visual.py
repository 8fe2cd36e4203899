"""``python -m abaw.extract visual``: face crops -> a timm backbone's features, one row per annotation frame.

    python -m abaw.extract visual --data-root ROOT --backbone vit_base_patch16_224.mae --weights mae.pth

Deliberate choices:

* The frame number is the crop's file name (``cropped_aligned/<video>/00042.jpg`` -> row 41), never its
  position in a listing; a frame without an image, a crop that does not decode, and every frame of a
  video without a crop folder are NaN rows (the reader turns them into zeros with a presence mask).
* The backbone is built with ``pretrained=False`` and ``num_classes=0`` and gets its weights from a local
  file only. Wrapper prefixes (``module.``, ``model.``, ``encoder.``) are stripped, the load is
  non-strict and its missing and unexpected keys are printed; a checkpoint of which no tensor fits
  the backbone is refused (it belongs to another one), and so is one whose matching tensors have other
  shapes (another size of the family). ``.pth`` files load with ``weights_only=True``: a checkpoint
  cannot run code.
* Preprocessing follows the model's data config (input size, interpolation, mean and std), but the
  whole crop is resized to the input size: the eval transform's centre crop would cut away face.
* JPEGs are decoded and resized in DataLoader workers, which hand over uint8 images (a quarter of
  the float32 bytes to copy); scaling and normalising run on the device. Batches run across videos,
  so short videos still fill a batch, and each video is written as soon as its last frame is done:
  a rerun skips every video already written.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..console import console
from ..data import CROPS_DIR
from .frames import (ExtractError, ExtractionReport, FeatureWriter, Target, extraction_targets, frame_images,
                     require_dir, require_file, rows_for_frames, run_extraction, torch_device)

POOLS = ("cls", "mean", "avg")
WRAPPER_PREFIXES = ("module.", "model.", "encoder.")  # DDP, Lightning-style wrappers, abaw.pretrain's encoder
NESTING_KEYS = ("state_dict", "model", "module")  # where training scripts put the weights in a checkpoint
SHOWN_KEYS = 10  # key names printed per list; the report keeps all of them


@dataclass(frozen=True)
class WeightsLoad:
    """What loading a checkpoint into the backbone did."""

    path: Path
    loaded: int  # tensors copied into the backbone
    missing: list[str]  # backbone tensors the checkpoint lacks: they keep their random initialisation
    unexpected: list[str]  # checkpoint tensors the backbone has no place for (a classifier head, a decoder)


@dataclass
class VisualReport(ExtractionReport):
    """An :class:`ExtractionReport` with the videos that had no crop folder and the weights load."""

    no_crops: list[str] = field(default_factory=list)  # written videos with no crop folder: every row NaN
    weights: WeightsLoad | None = None


def extract_visual(data_root, backbone: str, weights, frames_dir=None, pool: str = "cls", batch_size: int = 64,
                   workers: int = 2, device: str = "auto", name: str = "visual", dtype: str = "float16",
                   test_list=None, test_sample=None) -> VisualReport:
    """Write ``ROOT/features/<name>/<video>.npy`` for every train, validation and test video.

    ``pool``: ``cls`` the class token after the final norm (``forward_features`` then token 0, as
    Mamba-VA does), ``mean`` the mean of the patch tokens after the final norm (prefix tokens left
    out), ``avg`` the model's own pooled output (its head without the classifier).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # pretrained=False already; never reach a hub regardless
    check_options(pool, batch_size, workers)
    root = Path(data_root)
    crops = require_dir(frames_dir if frames_dir is not None else root / CROPS_DIR, "face crops (--frames)")
    weights = require_file(weights, "--weights checkpoint")
    targets = extraction_targets(root, test_list, test_sample)
    writer = FeatureWriter(root, name, dtype)
    pending = [t for t in targets if not writer.done(t)]  # run_extraction skips the same ones

    report = VisualReport()
    model = create_backbone(backbone)
    report.weights = load_weights(model, weights, backbone)
    encoder = FrameEncoder(model, backbone, pool, *torch_device(device))
    frames = pending_frames(pending, crops, report)
    features = BatchedFeatures(frames, encoder, batch_size, workers, report)
    try:
        settings = {"command": "visual", "backbone": backbone, "weights": weights.name,
                    "weights_bytes": weights.stat().st_size, "pool": pool}
        return run_extraction(targets, writer, features, f"visual {backbone} ({pool})", report, settings=settings)
    finally:
        features.close()  # stops the DataLoader workers, also after an error


def check_options(pool: str, batch_size: int, workers: int) -> None:
    if pool not in POOLS:
        raise ValueError(f"--pool must be one of {', '.join(POOLS)}, got {pool!r}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"--workers must be 0 (decode in the main process) or more, got {workers}")


# ---------------------------------------------------------------------------------------------------
# the backbone and its weights
# ---------------------------------------------------------------------------------------------------

def create_backbone(backbone: str):
    """The timm model without its classifier and with random weights: nothing is downloaded."""
    import timm

    if not timm.is_model(backbone):
        raise ExtractError(f"--backbone {backbone!r} is not a timm model name "
                           f"(timm.list_models('*vit*') lists them)")
    try:
        model = timm.create_model(backbone, pretrained=False, num_classes=0)
    except RuntimeError as exc:  # e.g. an unknown pretrained tag after the dot
        raise ExtractError(f"--backbone {backbone!r}: {exc}") from exc
    return model.eval().requires_grad_(False)


def read_checkpoint(path: Path) -> dict:
    """The tensors of a checkpoint file, unwrapped from ``state_dict``/``model``/``module`` nesting.

    Read by :func:`abaw.checkpoint.load_checkpoint`: ``.safetensors`` through safetensors, anything
    else (``.pth``, ``.pt``, ``.bin``) with ``torch.load(weights_only=True)``, which cannot run code.
    ``argparse.Namespace`` is allowed in it: training scripts (MAE's among them) save their arguments
    next to the weights.
    """
    from ..checkpoint import CheckpointError, load_checkpoint

    try:
        content = load_checkpoint(path, "cpu", allow=[argparse.Namespace])
    except CheckpointError as exc:
        raise ExtractError(str(exc)) from exc
    return _unwrap_state_dict(content, path)


def _unwrap_state_dict(content, path: Path) -> dict:
    import torch

    while isinstance(content, Mapping):
        nested = next((content[key] for key in NESTING_KEYS if isinstance(content.get(key), Mapping)), None)
        if nested is None:
            break
        content = nested
    tensors = {k: v for k, v in content.items() if isinstance(v, torch.Tensor)} if isinstance(content, Mapping) else {}
    if not tensors:
        found = sorted(content)[:SHOWN_KEYS] if isinstance(content, Mapping) else type(content).__name__
        raise ExtractError(f"{path}: no tensors found, not a state dict (found: {found})")
    return tensors


def backbone_key(key: str, backbone_keys) -> str | None:
    """``key`` as the backbone names it: as it is, or with wrapper prefixes stripped one at a time
    (``module.encoder.blocks.0...`` -> ``blocks.0...``); None when no form of it is a backbone key.

    A key is tried as it is first, so a backbone's own ``model.`` submodule is never stripped away."""
    while key not in backbone_keys:
        prefix = next((p for p in WRAPPER_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            return None
        key = key[len(prefix):]
    return key


def load_weights(model, path: Path, backbone: str) -> WeightsLoad:
    """Copy the checkpoint's tensors into ``model`` (non-strict), print what was missing and unexpected.

    Refused: a checkpoint of which no tensor fits (another backbone), and one whose tensors have other
    shapes than the backbone's (another size of the family, or another input size)."""
    checkpoint = read_checkpoint(path)
    own = model.state_dict()
    matched, unexpected, reshaped = {}, [], []
    for key, tensor in checkpoint.items():
        name = backbone_key(key, own)
        if name is None:
            unexpected.append(key)
        elif tuple(tensor.shape) != tuple(own[name].shape):
            reshaped.append(f"{key} {tuple(tensor.shape)} vs {tuple(own[name].shape)}")
        else:
            matched[name] = tensor
    if reshaped:
        raise ExtractError(f"{path}: {len(reshaped)} tensor(s) have another shape than in {backbone} (another size "
                           f"of the model, or another input size?): {', '.join(reshaped[:SHOWN_KEYS])}")
    if not matched:
        raise ExtractError(f"{path}: none of its {len(checkpoint)} tensors is a parameter of {backbone}: a checkpoint "
                           f"of another backbone? (it has {sorted(checkpoint)[:5]}, {backbone} has {list(own)[:5]})")
    model.load_state_dict(matched, strict=False)
    # BatchNorm's batch counter is read only in training: a checkpoint without it loses nothing
    missing = [k for k in own if k not in matched and not k.endswith("num_batches_tracked")]
    load = WeightsLoad(path, len(matched), missing, unexpected)
    print_weights_load(load, backbone, len(own))
    return load


def print_weights_load(load: WeightsLoad, backbone: str, n_backbone: int) -> None:
    console.print(f"weights: {load.loaded} of {n_backbone} tensors of {backbone} loaded from {load.path}", markup=False)
    for keys, what in ((load.missing, "missing from the checkpoint (kept random)"),
                       (load.unexpected, "unexpected (not in the backbone, ignored)")):
        if keys:
            more = f" ... and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
            console.print(f"  {len(keys)} {what}: {', '.join(keys[:SHOWN_KEYS])}{more}", markup=False)


# ---------------------------------------------------------------------------------------------------
# images -> features
# ---------------------------------------------------------------------------------------------------

def resample_filter(interpolation: str):
    from PIL import Image

    filters = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
               "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS,
               "box": Image.Resampling.BOX, "hamming": Image.Resampling.HAMMING}
    return filters.get(interpolation, Image.Resampling.BICUBIC)  # timm's default for an unnamed one


def read_crop(path, size: tuple[int, int], resample):
    """One face crop as a uint8 (3, H, W) tensor, the whole crop resized to ``size`` = (H, W)."""
    import torch
    from PIL import Image

    with Image.open(path) as image:
        rgb = image.convert("RGB")  # decodes the pixels: a broken file fails here
    if rgb.size != (size[1], size[0]):
        rgb = rgb.resize((size[1], size[0]), resample)
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)


UNREADABLE_IMAGE = (OSError, SyntaxError, ValueError)  # PIL's ways to fail on a broken or foreign file


class FaceCrops:
    """A map-style dataset of image files: (uint8 image, index, "" or why it could not be read).

    An image that does not decode comes back black with the reason, so that one bad file costs one
    NaN row instead of the run."""

    def __init__(self, paths: list[Path], size: tuple[int, int], resample):
        self.paths, self.size, self.resample = paths, size, resample

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        import torch
        from PIL import Image

        try:
            return read_crop(self.paths[index], self.size, self.resample), index, ""
        except (*UNREADABLE_IMAGE, Image.DecompressionBombError) as exc:
            return torch.zeros((3, *self.size), dtype=torch.uint8), index, f"{type(exc).__name__}: {exc}"


class FrameEncoder:
    """The backbone with its preprocessing and pool: uint8 image batches -> (B, width) float32 features."""

    def __init__(self, model, backbone: str, pool: str, device, autocast):
        import timm
        import torch

        config = timm.data.resolve_model_data_config(model)
        channels, *size = config["input_size"]
        if channels != 3:
            raise ExtractError(f"--backbone {backbone} takes {channels}-channel images; face crops are RGB")
        self.size = tuple(size)  # (H, W)
        self.resample = resample_filter(config.get("interpolation", "bicubic"))
        self.device, self.autocast, self.pool = device, autocast, pool
        self.model = model.to(device)
        self.prefix_tokens = getattr(model, "num_prefix_tokens", 0)
        self.mean = torch.tensor(config["mean"], device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(config["std"], device=device).view(1, 3, 1, 1) * 255
        self.width = self._probe(backbone)

    def _probe(self, backbone: str) -> int:
        """Check that ``pool`` fits the backbone on one blank image; the feature width."""
        import torch

        blank = torch.zeros((1, 3, *self.size), dtype=torch.uint8)
        if self.pool != "avg":
            with torch.inference_mode(), self.autocast:
                tokens = self.model.forward_features(self._normalise(blank))
            if tokens.ndim != 3:
                raise ExtractError(f"--pool {self.pool} needs tokens, but {backbone} gives a feature map of shape "
                                   f"{tuple(tokens.shape[1:])}: use --pool avg (the model's own pooling)")
            if self.pool == "cls" and getattr(self.model, "cls_token", None) is None:
                raise ExtractError(f"--pool cls: {backbone} has no class token: use --pool avg (the model's own "
                                   f"pooling) or --pool mean (the mean of its patch tokens)")
        return self(blank).shape[1]

    def _normalise(self, images):
        # on the device: the workers hand over uint8, a quarter of the bytes of float32
        return (images.to(self.device, non_blocking=True).float() - self.mean) / self.std

    def __call__(self, images) -> np.ndarray:
        import torch

        with torch.inference_mode(), self.autocast:
            x = self._normalise(images)
            if self.pool == "avg":
                out = self.model(x)  # num_classes=0 left the head without its classifier: the pooled features
            else:
                tokens = self.model.forward_features(x)  # timm applies the final norm here, ...
                out = tokens[:, 0] if self.pool == "cls" else tokens[:, self.prefix_tokens:].mean(dim=1)
                out = self.pooled_norm(out)
        return out.float().cpu().numpy()

    def pooled_norm(self, pooled):
        """... unless the model norms after pooling instead (BEiT, EVA: ``norm`` is Identity and the
        norm is ``fc_norm``): the pooled token then gets that norm, so cls / mean are normed for every model."""
        import torch

        fc_norm = getattr(self.model, "fc_norm", None)
        if isinstance(getattr(self.model, "norm", None), torch.nn.Identity) and fc_norm is not None:
            return fc_norm(pooled)
        return pooled


@dataclass
class PendingFrames:
    """Every image to encode, in video order: its video (index into ``targets``), frame and file."""

    targets: list[Target]
    video: np.ndarray  # int, per image
    frame: np.ndarray  # int, per image, 1-based
    paths: list[Path]


def pending_frames(pending: list[Target], crops: Path, report: VisualReport) -> PendingFrames:
    """The images of the videos to extract, frame numbers from their file names; images past a
    video's last annotation frame are left out (they have no row). A video without a crop folder
    has no images: all its rows will be NaN, and it is named."""
    video, frame, paths = [], [], []
    for index, target in enumerate(pending):
        folder = crops / target.video
        if not folder.is_dir():
            report.no_crops.append(target.video)
            continue
        for number, path in sorted(frame_images(folder).items()):
            if number <= target.n_frames:
                video.append(index)
                frame.append(number)
                paths.append(path)
    if report.no_crops:
        console.print(f"{len(report.no_crops)} video(s) have no folder in {crops}; all their rows are NaN: "
                      f"{', '.join(report.no_crops[:SHOWN_KEYS])}{' ...' if len(report.no_crops) > SHOWN_KEYS else ''}",
                      markup=False)
    return PendingFrames(pending, np.asarray(video, dtype=np.int64), np.asarray(frame, dtype=np.int64), paths)


def _one_thread(_worker_id: int) -> None:
    import torch

    torch.set_num_threads(1)  # a decoding worker needs no intra-op threads; they would only compete


class BatchedFeatures:
    """The features of every pending video, computed in batches that span videos and handed out one
    whole video at a time, in order: ``run_extraction`` calls it once per video and writes the result.

    Rows of a video that is not asked for yet wait here; a batch can hold the end of one video and the
    start of the next."""

    def __init__(self, frames: PendingFrames, encoder: FrameEncoder, batch_size: int, workers: int,
                 report: ExtractionReport):
        from torch.utils.data import DataLoader

        self.frames, self.encoder, self.report = frames, encoder, report
        self._index = {t.video: i for i, t in enumerate(frames.targets)}
        self._expected = np.bincount(frames.video, minlength=len(frames.targets))
        self._received = np.zeros(len(frames.targets), dtype=np.int64)
        self._rows: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        loader = DataLoader(FaceCrops(frames.paths, encoder.size, encoder.resample), batch_size=batch_size,
                            shuffle=False, num_workers=workers, worker_init_fn=_one_thread if workers else None,
                            pin_memory=encoder.device.type == "cuda")
        self._batches = iter(loader) if len(frames.paths) else iter(())

    def __call__(self, target: Target) -> np.ndarray:
        if target.video not in self._index:
            raise RuntimeError(f"{target.video}: not among the videos planned for extraction")
        video = self._index[target.video]
        while self._received[video] < self._expected[video]:
            batch = next(self._batches, None)
            if batch is None:
                raise RuntimeError(f"{target.video}: the image loader ended before the video's last frame")
            self._take(*batch)
        chunks = self._rows.pop(video, [])
        frames = np.concatenate([f for f, _ in chunks]) if chunks else np.zeros(0, dtype=np.int64)
        values = (np.concatenate([v for _, v in chunks]) if chunks
                  else np.zeros((0, self.encoder.width), dtype=np.float32))
        return rows_for_frames(target.n_frames, frames, values)

    def _take(self, images, indices, errors) -> None:
        """Encode one batch and file its rows under their videos; unreadable images are named (no row)."""
        import torch

        indices = indices.numpy()
        np.add.at(self._received, self.frames.video[indices], 1)  # an unreadable image is done too
        readable = np.array([not error for error in errors], dtype=bool)
        for index, error in zip(indices[~readable], np.asarray(errors)[~readable]):
            self.report.unreadable.append(f"{self.frames.paths[index]}: {error}")
        if not readable.any():
            return
        if not readable.all():  # indexing copies; the usual all-readable batch stays in pinned memory
            images, indices = images[torch.from_numpy(readable)], indices[readable]
        features = self.encoder(images)
        videos = self.frames.video[indices]
        for video in np.unique(videos):
            mine = videos == video
            self._rows.setdefault(int(video), []).append((self.frames.frame[indices[mine]], features[mine]))

    def close(self) -> None:
        self._batches = iter(())  # drops the DataLoader iterator, which stops its workers
