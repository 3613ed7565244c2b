"""The one atomic-write helper: a failed write leaves the old file and no temporary file, the
new file gets the umask's mode whatever its writer chose, create-if-absent refuses an existing
name, and a folder replaces a folder."""

from __future__ import annotations

import os
import stat

import pytest

from twa_ray.core.atomic import atomic_path, file_mode, publish


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="disk"), atomic_path(target) as tmp:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]


def test_the_new_file_gets_the_umask_mode_not_its_writers(tmp_path, umask_027):
    target = tmp_path / "m.bin"
    with atomic_path(target) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)  # like safetensors or mkstemp
        os.close(fd)
    assert file_mode() == 0o640 and stat.S_IMODE(target.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["m.bin"]


def test_publish_without_overwrite_refuses_an_existing_name(tmp_path):
    target, tmp = tmp_path / "c", tmp_path / ".c.x.tmp"
    target.write_text("first")
    tmp.write_text("second")
    with pytest.raises(FileExistsError):
        publish(tmp, target, overwrite=False)
    assert target.read_text() == "first"
    target.unlink()
    publish(tmp, target, overwrite=False)
    assert target.read_text() == "second" and not tmp.exists()


def test_a_folder_replaces_a_folder(tmp_path):
    target = tmp_path / "hf"
    target.mkdir()
    (target / "stale.bin").write_text("old")
    with atomic_path(target) as tmp:
        os.mkdir(tmp)
        with open(os.path.join(tmp, "model.safetensors"), "w") as f:
            f.write("new")
    assert os.listdir(target) == ["model.safetensors"] and os.listdir(tmp_path) == ["hf"]
