"""Atomic writes survive a machine crash too: data synced before the rename, the folder after it."""
import os
import shutil
from pathlib import Path

import pytest

from abaw import demo
from abaw.io import atomic_path, atomic_write_text
from abaw.submission import _publish

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(),
                                reason="names the synced descriptors through /proc/self/fd (Linux)")


@pytest.fixture
def disk_log(monkeypatch) -> list[tuple]:
    """Every fsync (with the path and, for a file, the bytes it holds then), rename, replace and rmtree, in order."""
    events: list[tuple] = []
    real = {name: getattr(os, name) for name in ("fsync", "replace", "rename")}
    real_rmtree = shutil.rmtree

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", path, Path(path).read_bytes() if os.path.isfile(path) else None))
        real["fsync"](fd)

    def mover(name):
        def move(src, dst, *args, **kwargs):
            events.append((name, os.path.realpath(src), os.path.realpath(dst)))
            real[name](src, dst, *args, **kwargs)
        return move

    def rmtree(path, *args, **kwargs):
        events.append(("rmtree", os.path.realpath(path), None))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", mover("replace"))
    monkeypatch.setattr(os, "rename", mover("rename"))
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    return events


def test_atomic_write_syncs_the_data_before_the_rename_and_the_folder_after(tmp_path, disk_log):
    target = tmp_path / "out.txt"
    target.write_text("old")
    atomic_write_text(target, "new")
    assert [event[0] for event in disk_log] == ["fsync", "replace", "fsync"]
    (_, synced, data), (_, src, dst), (_, folder, _) = disk_log
    assert synced == src and data == b"new"  # the temporary file, already holding the new text
    assert dst == os.path.realpath(target) and folder == os.path.realpath(tmp_path)
    assert target.read_text() == "new"


def test_a_failed_write_syncs_and_publishes_nothing(tmp_path, disk_log):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(ZeroDivisionError), atomic_path(target) as tmp:
        tmp.write_text("half")
        1 / 0
    assert disk_log == [] and target.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_published_submission_folder_is_synced_before_the_old_one_goes(tmp_path, disk_log, overwrite):
    staging, out_dir = tmp_path / ".sub.staging", tmp_path / "sub"
    staging.mkdir()
    (staging / "submission.txt").write_text("new")
    if overwrite:
        out_dir.mkdir()
        (out_dir / "submission.txt").write_text("old")
    _publish(staging, out_dir, overwrite)
    moved = disk_log.index(("rename", os.path.realpath(staging), os.path.realpath(out_dir)))
    assert disk_log[moved + 1] == ("fsync", os.path.realpath(tmp_path), None)
    assert [event[0] for event in disk_log[moved + 2:]] == (["rmtree"] if overwrite else [])
    assert (out_dir / "submission.txt").read_text() == "new" and os.listdir(tmp_path) == ["sub"]


def test_the_demo_folder_is_synced_after_its_rename(tmp_path, disk_log):
    root = demo.generate(tmp_path / "root", demo.DemoSpec(n_train=3, n_val=1, n_test=1, max_frames=400))
    (kind, _, dst), last = disk_log[-2:]
    assert (kind, dst) == ("rename", os.path.realpath(root))
    assert last == ("fsync", os.path.realpath(tmp_path), None)


@pytest.mark.parametrize("url, shown", [
    ("postgresql://abaw:s3cr%40t@db.lab:5432/studies", "postgresql://abaw:***@db.lab:5432/studies"),
    ("postgresql+psycopg2://u:p@h/d?sslmode=require", "postgresql+psycopg2://u:***@h/d?sslmode=require"),
    ("postgresql://u:a/b?c#d@h/d", "postgresql://u:***@h/d"),  # SQLAlchemy reads the password "a/b?c#d"
    ("postgresql://abaw@db.lab/studies", "postgresql://abaw@db.lab/studies"),  # no password: unchanged
    ("sqlite:////tmp/x/study.db", "sqlite:////tmp/x/study.db"),
    ("runs/s/journal.log", "runs/s/journal.log"),
])
def test_a_storage_url_keeps_no_password(url, shown):
    from abaw.io import redact_url

    assert redact_url(url) == shown
