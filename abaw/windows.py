"""Fixed-length training windows over videos, and whole-video prediction from window outputs.

Unlike the published code, windows cover every frame: the last window of a video is anchored at
its end (so no tail is dropped) and a video shorter than a window becomes one padded, masked window
(so no video is skipped).

Frames without a face (NaN feature rows) are zero-filled. With ``presence=True`` each modality gets
one more channel, 1 where the frame has its feature and 0 where it has none, so a model can tell a
missing face from a real feature vector near zero (the published systems could not: they
zero-fill or forward-fill and feed the result as if it were real).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from .data import VideoRecord

DEFAULT_WINDOW = 300
DEFAULT_HOP = 200


def window_starts(n_frames: int, window: int = DEFAULT_WINDOW, hop: int = DEFAULT_HOP) -> list[int]:
    """Start frames of windows covering [0, n_frames); the last one ends exactly at n_frames."""
    if window <= 0 or hop <= 0:
        raise ValueError(f"window ({window}) and hop ({hop}) must be positive")
    if hop > window:
        raise ValueError(f"hop ({hop}) larger than window ({window}) would leave frames uncovered")
    if n_frames <= window:
        return [0]
    starts = list(range(0, n_frames - window + 1, hop))
    if starts[-1] + window < n_frames:
        starts.append(n_frames - window)
    return starts


def read_window(video: VideoRecord, modalities: Sequence[str], start: int, length: int,
                presence: bool = False) -> dict[str, np.ndarray]:
    """One window of ``length`` frames from ``start``, padded past the video's end.

    Returns numpy arrays: one (length, D_m) float32 per modality ((length, D_m + 1) with
    ``presence``: the last channel is 1 where the frame has its feature), ``mask`` (length,) True on
    real frames, ``labels`` (length, 2) and ``label_mask`` (length,) True where the label counts.
    """
    stop = min(start + length, video.n_frames)
    real = stop - start
    item: dict[str, np.ndarray] = {}
    for modality in modalities:
        feats, present = video.features(modality, start, stop)
        padded = np.zeros((length, feats.shape[1] + int(presence)), np.float32)
        padded[:real, :feats.shape[1]] = feats
        if presence:
            padded[:real, -1] = present
        item[modality] = padded
    item["mask"] = np.arange(length) < real
    item["labels"] = np.zeros((length, 2), np.float32)
    item["label_mask"] = np.zeros(length, bool)
    if video.labels is not None:
        item["labels"][:real] = video.labels[start:stop]
        item["label_mask"][:real] = video.label_mask[start:stop]
    return item


class WindowDataset(TorchDataset):
    """Training windows of ``window`` frames every ``hop`` frames over a list of videos.

    Each item is a dict of float32/bool tensors: modality -> (window, D_m), ``mask`` (window,),
    ``labels`` (window, 2), ``label_mask`` (window,); the default collate stacks them to (B, ...).
    """

    def __init__(self, videos: Sequence[VideoRecord], modalities: Sequence[str],
                 window: int = DEFAULT_WINDOW, hop: int = DEFAULT_HOP, presence: bool = False):
        self.videos = list(videos)
        self.modalities = tuple(modalities)
        self.window = window
        self.presence = presence
        self.index = [(i, s) for i, v in enumerate(self.videos) for s in window_starts(v.n_frames, window, hop)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        video, start = self.index[i]
        item = read_window(self.videos[video], self.modalities, start, self.window, self.presence)
        return {k: torch.from_numpy(v) for k, v in item.items()}


def _batch(items: list[dict[str, np.ndarray]], modalities, device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    feats = {m: torch.from_numpy(np.stack([it[m] for it in items])).to(device) for m in modalities}
    mask = torch.from_numpy(np.stack([it["mask"] for it in items])).to(device)
    return feats, mask


def predict_video(model: torch.nn.Module, video: VideoRecord, window: int = DEFAULT_WINDOW,
                  hop: int = DEFAULT_HOP, device: str | torch.device = "cpu", full_sequence: bool = False,
                  batch_size: int = 16) -> np.ndarray:
    """Predict (T, 2) for a whole video.

    By default the video is cut into windows like training data and overlapping window outputs
    are averaged per frame. ``full_sequence=True`` runs the model once over all T frames instead
    (for models that generalise past their training length, e.g. causal TCN/Mamba). A model built
    to read a presence channel (``model.presence_channel``, set by ``abaw.train.build_model``) gets it.
    """
    return predict_videos(model, [video], window, hop, device, full_sequence, batch_size)[video.name]


@torch.no_grad()
def predict_videos(model: torch.nn.Module, videos: Sequence[VideoRecord], window: int = DEFAULT_WINDOW,
                   hop: int = DEFAULT_HOP, device: str | torch.device = "cpu", full_sequence: bool = False,
                   batch_size: int = 64) -> dict[str, np.ndarray]:
    """:func:`predict_video` for many videos: video name -> (T, 2).

    Windows of different videos share batches, so a validation pass runs in full batches instead
    of one part-filled batch per video. Every model here treats the windows of a batch
    independently, so each window's output is the one it gets alone, up to float rounding (matrix
    products may sum in another order at another batch size).
    """
    model.eval()
    modalities = model.modalities
    presence = getattr(model, "presence_channel", False)
    if full_sequence:  # one whole video per batch: lengths differ
        jobs = [(video, 0, video.n_frames) for video in videos]
        batch_size = 1
    else:
        jobs = [(video, start, window) for video in videos for start in window_starts(video.n_frames, window, hop)]
    total = {v.name: np.zeros((v.n_frames, 2), np.float64) for v in videos}
    count = {v.name: np.zeros(v.n_frames, np.float64) for v in videos}
    for first in range(0, len(jobs), batch_size):
        chunk = jobs[first:first + batch_size]
        length = chunk[0][2]
        items = [read_window(video, modalities, start, length, presence) for video, start, _ in chunk]
        feats, mask = _batch(items, modalities, device)
        out = model(feats, mask).float().cpu().numpy()  # (B, length, 2)
        for (video, start, _), pred in zip(chunk, out):
            stop = min(start + length, video.n_frames)
            total[video.name][start:stop] += pred[: stop - start]
            count[video.name][start:stop] += 1
    return {name: (total[name] / count[name][:, None]).astype(np.float32) for name in total}
