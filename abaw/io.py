"""Atomic file writes: a crash or a kill leaves either the old file or the new one, never half of one.

A kill alone needs only the rename; a crash of the machine (power, kernel) also needs the data on
disk before the rename and the rename itself on disk after it, hence the two fsyncs.
"""
from __future__ import annotations

import codecs
import errno
import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is synced and renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _naming(exc, path) from exc
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual permissions
    try:
        yield Path(tmp)
        fsync_file(tmp)  # else a crash after the rename may publish a name with no data behind it
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        raise _naming(exc, path) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` naming ``path`` where it names no file or our temporary one (a full disk's write names
    none): the user knows the file they asked for, never its hidden temporary name. Another file's
    error (one read inside the ``with``) keeps its own name."""
    name = exc.filename
    if name is not None and not (Path(name).name.startswith(f".{path.name}.") and str(name).endswith(".tmp")):
        return exc
    return OSError(exc.errno, exc.strerror or str(exc), str(path))  # OSError picks the subclass from errno


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s data to disk (the writer may have closed it without syncing)."""
    fd = os.open(path, os.O_RDWR)  # read-write: Windows refuses to flush a read-only handle
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush folder ``path``'s entries to disk, so that a rename into it survives a crash.

    A no-op where folders cannot be opened (Windows, which has no ``O_DIRECTORY``) or synced (some
    network and FUSE filesystems refuse with EINVAL/ENOTSUP): the rename itself has happened, and
    failing the caller then would lose a finished result for a durability the filesystem cannot give."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class TextDecodeError(ValueError):
    """A text input that cannot be decoded, with the (1-based) line where decoding fails."""

    def __init__(self, path: str | Path, line: int, reason: str):
        self.path, self.line, self.reason = Path(path), line, reason
        super().__init__(f"{path}:{line}: {reason}")


# UTF-16 is read only with its byte-order mark, which makes it unambiguous (FF FE / FE FF can never
# start UTF-8 text) and is what Windows tools write (PowerShell 5's `>`, Excel's "Unicode text").
_UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def _decode(path: str | Path, raw: bytes) -> str:
    codec, name = ("utf-16", "UTF-16") if raw[:2] in _UTF16_BOMS else ("utf-8-sig", "UTF-8")
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].decode(codec, errors="replace").count("\n") + 1
        raise TextDecodeError(path, line, f"not {name} text ({exc.reason} at byte {exc.start}); save it as "
                                          f"UTF-8 (plain ASCII is UTF-8)") from None
    if "\0" in text:  # valid UTF-8, yet no text file holds NULs: UTF-16 without its mark, or binary
        line = text[:text.index("\0")].count("\n") + 1
        raise TextDecodeError(path, line, "NUL character: UTF-16 without a byte-order mark, or not a text file; "
                                          "save it as UTF-8")
    return text


def text_lines(path: str | Path) -> list[str]:
    """A text file's lines without CRLF endings or a BOM; trailing blank lines dropped (both are valid input).

    UTF-8 (with or without a BOM), or UTF-16 with its BOM; anything else raises :class:`TextDecodeError`."""
    lines = _decode(path, Path(path).read_bytes()).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return lines


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    import torch

    # Through a Python file: torch.save on a path reports a full disk as a RuntimeError
    # ("unexpected pos"), through a file as the OSError (ENOSPC) it is.
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


_OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT}


def explain_os_error(exc: OSError) -> str:
    """The one line a command prints for a failed file operation (after ``error:``), naming the path.

    A full disk gets what happened and what to do: every writer here is atomic, so the file being
    written is absent or its previous version, and finished work (folds, videos, submissions) stays."""
    what = (exc.strerror or str(exc)).rstrip(".")
    what = what[:1].lower() + what[1:]
    where = exc.filename if exc.filename is not None else "a file"
    if exc.errno in _OUT_OF_SPACE:
        return (f"{what} while writing {where}; nothing finished was lost: free space and rerun the "
                f"same command")
    return f"{what}: {where}" if exc.filename is not None else what


# The password runs to the first "@", as SQLAlchemy reads it: it may hold "/", "?" or "#".
_URL_PASSWORD = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@?#]*):[^@]*@")


def redact_url(url: str | None) -> str | None:
    """A URL with its password replaced by ``***`` (``postgresql://user:***@host/db``), for any file or
    message: run folders, configs and logs are shared with teammates."""
    if url is None:
        return None
    return _URL_PASSWORD.sub(r"\g<head>:***@", url)
