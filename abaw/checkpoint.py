"""Loading checkpoints without running code: the one loader for the toolkit's own files and third-party weights.

A pickle can name any Python callable, and unpickling calls it: ``torch.load(weights_only=False)`` on a
file from a shared run folder or a download runs whatever its author chose. So every checkpoint is read
with ``torch.load(weights_only=True)`` (tensors and plain Python values only), or through safetensors
(``.safetensors``: no pickle at all). A file that needs more is refused, never loaded another way.
"""
from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# torch's marker of a pickle that asked for something weights_only does not allow
WEIGHTS_ONLY_FAILED = "Weights only load failed"
# ... unless what it met is no pickle instruction at all: garbage bytes, not an object it refused
NOT_A_PICKLE = "Unsupported operand"
RESAVE_ADVICE = ("re-save its state dict alone as tensors (torch.save(checkpoint['model'], 'weights.pth')) or "
                 "as .safetensors, from a copy you trust")


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded safely; the message names the file, ``reason`` is torch's own line."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


class UnsafeCheckpoint(CheckpointError):
    """The pickle needs objects other than tensors and plain values: loading it could run code."""


class UnreadableCheckpoint(CheckpointError):
    """Truncated, corrupt, or not a checkpoint at all."""


def numpy_scalars() -> list:
    """What numpy scalars in an older abaw checkpoint need (its history's float64 values): numpy's scalar
    constructor and its dtypes. Harmless, and torch's documentation names them as safe to allow."""
    import numpy as np

    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    kinds = (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_)
    return [scalar, np.dtype, *(type(np.dtype(kind)) for kind in kinds)]


def load_checkpoint(path: str | Path, map_location: Any = "cpu", allow: Iterable[type] = ()) -> Any:
    """``path``'s content: ``.safetensors`` through safetensors, anything else with
    ``torch.load(weights_only=True)``; ``allow`` names further harmless classes (e.g. argparse.Namespace).

    Raises :class:`UnsafeCheckpoint` or :class:`UnreadableCheckpoint`; a missing file is FileNotFoundError."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path, map_location)
    import torch

    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except OSError:  # missing, a folder, no permission: not the file's content, so not ours to judge
        raise
    except pickle.UnpicklingError as exc:
        if WEIGHTS_ONLY_FAILED not in str(exc) or NOT_A_PICKLE in str(exc):
            raise _unreadable(path, exc) from exc
        reason = short_reason(exc)
        raise UnsafeCheckpoint(
            f"{path}: cannot load the checkpoint with torch.load(weights_only=True): {reason}. It needs objects "
            f"other than tensors and plain Python values, and unpickling those could run code, so it was not "
            f"loaded; {RESAVE_ADVICE}", reason) from exc
    except Exception as exc:  # noqa: BLE001 - garbage bytes fail anywhere in the zip reader or the unpickler
        raise _unreadable(path, exc) from exc


def _load_safetensors(path: Path, map_location: Any) -> dict:
    import torch
    from safetensors.torch import load_file

    device = str(torch.device(map_location)) if map_location is not None else "cpu"
    if not path.exists():
        raise FileNotFoundError(path)
    try:
        return load_file(str(path), device=device)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same message naming it
        raise UnreadableCheckpoint(f"{path}: cannot read the safetensors checkpoint: {exc}", str(exc)) from exc


def _unreadable(path: Path, exc: Exception) -> UnreadableCheckpoint:
    reason = short_reason(exc)
    return UnreadableCheckpoint(f"{path}: cannot load the checkpoint: {reason} (the file is truncated, corrupt "
                                f"or not a torch checkpoint)", reason)


def describe(exc: CheckpointError) -> str:
    """What is wrong with the file, for a sentence "<path> is ...": the toolkit's own files say so and move on."""
    if isinstance(exc, UnsafeCheckpoint):
        return (f"unsafe to load: it needs objects other than tensors and plain values, and unpickling those "
                f"could run code ({exc.reason}); it was not loaded")
    return f"unreadable (truncated or corrupt: {exc.reason})"


def short_reason(exc: Exception) -> str:
    """torch's errors are a page of advice; the line naming the refused object is what matters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if "unsupported" in line.lower() and "file an issue" not in line]
    reason = (named or lines or [type(exc).__name__])[0]
    return reason.split(". Please use")[0].split(". This is an internal")[0].rstrip(".")
