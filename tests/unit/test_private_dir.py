"""cluster.local.procs.private_dir: a helper's state folder under /tmp is this user's only; a symlink or another
user's folder in its place is refused by name, never followed or shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cluster.local.procs import ServiceError, private_dir


def test_made_0700_and_an_open_one_of_ours_is_closed(tmp_path: Path) -> None:
    made = private_dir(tmp_path / "state")
    assert made.is_dir() and oct(made.stat().st_mode & 0o777) == "0o700"
    (tmp_path / "readable").mkdir()
    os.chmod(tmp_path / "readable", 0o755)
    assert oct(private_dir(tmp_path / "readable").stat().st_mode & 0o777) == "0o700"
    (tmp_path / "open").mkdir()
    os.chmod(tmp_path / "open", 0o1777)  # anyone could have planted something in it
    with pytest.raises(ServiceError, match=r"open is writable by other users \(mode 1777\)"):
        private_dir(tmp_path / "open")


def test_a_symlink_in_its_place_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "state").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ServiceError, match=r"state is a symlink or not a folder"):
        private_dir(tmp_path / "state")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ServiceError, match=r"file is a symlink or not a folder"):
        private_dir(tmp_path / "file")


@pytest.mark.skipif(os.geteuid() != 0, reason="making a folder of another user needs root")
def test_another_users_folder_is_refused_unless_named(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 65534, 65534)  # nobody
    with pytest.raises(ServiceError, match=r"theirs belongs to uid 65534, not to this user"):
        private_dir(theirs)
    assert private_dir(theirs, owners=[65534]) == theirs
