"""Faults on purpose: a full disk, a run folder we may not write, SIGTERM in the middle of a command.

For each: nothing finished is lost, no half-written file is left where a reader would take it for
whole, and the command prints one clear line (``error: ...`` or ``interrupted (SIGTERM): ...``)
naming the path, never a traceback.
"""
import builtins
import errno
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from abaw import cli
from abaw.console import Terminated, sigterm_raises
from abaw.extract.__main__ import main as extract_main
from abaw.io import atomic_torch_save, atomic_write_json, atomic_write_text, explain_os_error
from abaw.submission import main as submission_main
from test_submission import TINY, write_run

from abaw import demo

REPO = Path(__file__).resolve().parents[1]
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[^.]+\.tmp$")  # abaw.io.atomic_path's temporary files
_STAGING = re.compile(r"/\.([^/]+)\.staging-[0-9a-f]+/")  # abaw.submission.writer's staging folders


class FullDisk:
    """The disk fills up for chosen files: a write into the temporary file of a target whose path ends
    with a chosen suffix lands half its bytes, then fails with ENOSPC, as a write on a full disk does.

    Every atomic writer (text, JSON, torch, numpy, pandas, zip) opens its temporary file with
    ``open``/``io.open``, so patching those reaches them all without knowing how each one writes."""

    def __init__(self, monkeypatch):
        self.targets: dict[str, int] = {}  # path suffix -> writes of it still let through
        self.hits: list[Path] = []
        real_open = builtins.open

        def open_(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            return _Filling(handle) if self._full(file, mode) else handle

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)

    def fill(self, suffix: str, after: int = 0) -> None:
        """Writes of targets ending with ``suffix`` fail, after ``after`` of them succeeded."""
        self.targets[suffix] = after

    def free(self) -> None:
        self.targets.clear()

    def _full(self, file, mode: str) -> bool:
        if not isinstance(file, (str, os.PathLike)) or not set(mode) & set("wax"):
            return False
        match = _TEMPORARY.match(Path(file).name)
        target = (Path(file).parent / match["name"]).as_posix() if match else ""
        target = _STAGING.sub(r"/\1/", target)  # a submission's files are written in its staging folder
        for suffix, after in self.targets.items():
            if match and target.endswith(suffix):
                self.targets[suffix] = max(0, after - 1)
                if after == 0:
                    self.hits.append(Path(target))
                return after == 0
        return False


class _Filling:
    """A file on a full disk: half of the first write lands, then ENOSPC (and on every write after)."""

    def __init__(self, handle):
        self._handle = handle

    def write(self, data):
        self._handle.write(data[: len(data) // 2])
        self._handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


@pytest.fixture
def full_disk(monkeypatch) -> FullDisk:
    return FullDisk(monkeypatch)


def leftovers(folder: Path) -> list[Path]:
    """Temporary files and staging folders: what a writer must never leave behind."""
    return [p for p in folder.rglob(".*") if _TEMPORARY.match(p.name) or ".staging-" in p.name
            or ".replaced-" in p.name or ".write-probe." in p.name]


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(text: str, *words: str) -> None:
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, text
    for word in words:
        assert word in lines[0], lines[0]


SPACE = "no space left on device while writing"
RERUN = "nothing finished was lost: free space and rerun the same command"

# ---------------------------------------------------------------------------------------------
# 1. The disk fills up


WRITERS = {"text": lambda p: atomic_write_text(p, "new " * 1000),
           "json": lambda p: atomic_write_json(p, {"new": list(range(1000))}),
           "torch": lambda p: atomic_torch_save(p, {"new": torch.arange(1000)})}


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_full_disk_keeps_the_previous_file_and_no_temporary(tmp_path, full_disk, monkeypatch, writer, where):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    if where == "write":
        full_disk.fill("out.bin")
    else:  # some filesystems (NFS, delayed allocation) report a full disk only when the data is flushed
        def fsync_full(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr("abaw.io.fsync_file", fsync_full)
    with pytest.raises(OSError) as caught:
        WRITERS[writer](target)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert explain_os_error(caught.value) == f"{SPACE} {target}; {RERUN}"
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


def cv_args(root, out, epochs=2):
    return ["--data-root", str(root), "--out", str(out), "--arch", "linear", "--folds", "3", "--epochs",
            str(epochs), "--window", "200", "--hop", "200"]


@pytest.mark.parametrize("target, after", [
    ("linear/fold1/last.pt", 1),    # the second epoch's checkpoint: the first one stays, whole
    ("linear/test/fold1.csv", 0),   # the fold's predictions, after its oof.csv: the fold is not complete
    ("linear/fold1/metrics.json", 0),  # the very last write of a fold
])
def test_a_full_disk_mid_fold_keeps_the_finished_folds(small_root, tmp_path, monkeypatch, full_disk, capsys,
                                                       target, after):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    full_disk.fill(target, after=after)
    assert cli.run_cv_main(cv_args(small_root, run)) == 2
    one_error_line(capsys.readouterr().out, SPACE, str(run / target), RERUN)
    assert full_disk.hits == [run / target]
    assert leftovers(run) == []
    assert not (run / "linear" / "fold1" / "metrics.json").exists()  # never taken for a finished fold
    if target.endswith("last.pt"):  # the previous checkpoint, whole: the rerun resumes from it
        assert torch.load(run / target, weights_only=True)["state"]["epoch"] == 1
    else:
        assert not (run / target).exists()
    fold0 = digests(run / "linear" / "fold0")
    assert json.loads((run / "linear" / "fold0" / "metrics.json").read_text())["status"] == "completed"

    full_disk.free()
    assert cli.run_cv_main(cv_args(small_root, run)) == 0
    assert "1 already complete, 2 to train" in capsys.readouterr().out
    assert digests(run / "linear" / "fold0") == fold0 and leftovers(run) == []


def import_csvs(folder: Path, videos=("a", "b_left", "b_right", "c", "t1", "t2"), n=20) -> Path:
    for video in videos:
        rows = [f"{f},{f / 4},{f / 8}" for f in range(1, n + 1)]
        (folder / f"{video}.csv").parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{video}.csv").write_text("frame,f0,f1\n" + "\n".join(rows) + "\n")
    return folder


def test_a_full_disk_mid_extraction_keeps_the_finished_videos(tiny_root, tmp_path, full_disk, capsys):
    args = ["import", "--data-root", str(tiny_root), "--csv", str(import_csvs(tmp_path / "csv")),
            "--frame-column", "frame"]
    folder = tiny_root / "features" / "imported"
    full_disk.fill("imported/b_left.npy")  # the second video, in name order
    assert extract_main(args) == 1
    one_error_line(capsys.readouterr().out, SPACE, str(folder / "b_left.npy"), RERUN)
    assert np.load(folder / "a.npy").shape == (20, 2)  # finished before the disk filled: whole
    assert not (folder / "b_left.npy").exists() and leftovers(folder) == []
    finished = digests(folder)

    full_disk.free()
    assert extract_main(args) == 0
    assert "1 video(s) already extracted" in capsys.readouterr().out
    assert {k: v for k, v in digests(folder).items() if k in finished} == finished
    assert sorted(p.stem for p in folder.glob("*.npy")) == ["a", "b_left", "b_right", "c", "t1", "t2"]


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory) -> Path:
    return demo.generate(tmp_path_factory.mktemp("tiny") / "demo", TINY)


@pytest.fixture(scope="module")
def finished_run(tiny_demo, tmp_path_factory) -> Path:
    return write_run(tmp_path_factory.mktemp("runs") / "grouped", tiny_demo)


def submission_args(run: Path, out: Path, *extra: str) -> list[str]:
    return ["--runs", str(run), "--out", str(out), "--merge", "mean", "--post", "none", *extra]


@pytest.mark.parametrize("target", ["sub/predictions.txt", "sub/sub.zip", "sub/manifest.json"])
@pytest.mark.parametrize("previous", [False, True])
def test_a_full_disk_mid_submission_publishes_nothing(finished_run, tmp_path, full_disk, capsys, target, previous):
    out = tmp_path / "submissions" / "sub"
    if previous:  # a finished submission that --overwrite would replace: it stays, whole
        assert submission_main(submission_args(finished_run, out)) == 0
    before = digests(out) if previous else None
    capsys.readouterr()
    full_disk.fill(target)
    assert submission_main(submission_args(finished_run, out, "--overwrite")) == 1
    one_error_line(capsys.readouterr().out, SPACE, str(tmp_path / "submissions" / target), RERUN)
    assert (digests(out) == before) if previous else not out.exists()
    assert leftovers(tmp_path / "submissions") == []

    full_disk.free()
    assert submission_main(submission_args(finished_run, out, "--overwrite")) == 0
    assert zipfile.ZipFile(out / "sub.zip").namelist() == ["predictions.txt"]


# ---------------------------------------------------------------------------------------------
# 2. A run folder we may not write


def test_an_unwritable_run_folder_is_refused_before_training(small_root, tmp_path, monkeypatch, capsys):
    """Tests run as root, whom permissions do not stop: the first write into the run folder is refused."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if os.path.dirname(os.path.abspath(path)) == str(run):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing_open)
    start = time.perf_counter()
    assert cli.run_cv_main(cv_args(small_root, run, epochs=1)) == 2
    one_error_line(capsys.readouterr().out, f"the run folder {run} is not writable (permission denied)",
                   "nothing was trained")
    assert sorted(p.name for p in run.iterdir()) == []  # no config.yaml, no fold folder
    assert time.perf_counter() - start < 30


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes whatever the permissions")
def test_a_read_only_run_folder_is_refused_before_training(small_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    run.chmod(0o555)
    try:
        assert cli.run_cv_main(cv_args(small_root, run, epochs=1)) == 2
    finally:
        run.chmod(0o755)
    one_error_line(capsys.readouterr().out, f"the run folder {run} is not writable", "nothing was trained")
    assert list(run.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 3. SIGTERM in the middle of make_submission.py


def test_sigterm_raises_like_ctrl_c_and_the_old_handler_comes_back():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated), sigterm_raises():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises here, at once
    assert isinstance(Terminated(), KeyboardInterrupt) and signal.getsignal(signal.SIGTERM) is before


# make_submission.py as it runs, but its predictions.txt is written in two halves with a pause between:
# the SIGTERM lands while half a file is on disk.
HALF_WRITTEN = """
import runpy, sys, time
import abaw.submission.writer as writer
from abaw.io import atomic_path

def slow_write(path, text):
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        handle.write(text[: len(text) // 2])
        handle.flush()
        print("half written", flush=True)
        time.sleep(120)
        handle.write(text[len(text) // 2:])

writer.atomic_write_text = slow_write
sys.argv = ["make_submission.py", *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.timeout(300)  # the test reads the child's output until a line: never hang CI on a stalled child
def test_sigterm_mid_submission_leaves_nothing_and_a_rerun_completes(finished_run, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "submissions" / "sub"
    (tmp_path / "make_submission.py").symlink_to(REPO / "make_submission.py")
    proc = subprocess.Popen([sys.executable, "-c", HALF_WRITTEN, *submission_args(finished_run, out)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:  # a pipe: blocks until the child prints, or ends
        seen.append(line)
        if line.startswith("half written"):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=60)
    text = "".join(seen) + rest
    assert proc.returncode == 128 + signal.SIGTERM, text
    assert "interrupted (SIGTERM): nothing was written; rerun the same command for the complete output" in text
    assert "Traceback" not in text
    assert not out.exists() and leftovers(tmp_path / "submissions") == []

    rerun = subprocess.run([sys.executable, str(REPO / "make_submission.py"), *submission_args(finished_run, out)],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert zipfile.ZipFile(out / "sub.zip").namelist() == ["predictions.txt"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert len((out / "predictions.txt").read_text().splitlines()) == manifest["rows"] + 1
