"""The install works on any machine: no local path, file URL or host-specific index in the files that install
rtrain, and torch pinned by version alone (pip picks the CPU or CUDA build from the indexes it is given)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL_FILES = ["constraints.txt", "pyproject.toml", "setup.py", "Makefile", ".ci/run"]
# A direct reference (name @ url), a file URL, an index or find-links option, a wheel named by path, a machine's
# own wheel folders.
HOST_SPECIFIC = re.compile(r"file:|\s@\s|--?(extra-)?index-url|--?find-links|\.whl\b|/opt/|https?://", re.I)


@pytest.mark.parametrize("name", INSTALL_FILES)
def test_install_files_name_no_local_path_or_index(name):
    found = [f"{name}:{number}: {line.strip()}"
             for number, line in enumerate((REPO / name).read_text().splitlines(), 1)
             if HOST_SPECIFIC.search(line)]
    assert not found, "host-specific install source(s):\n" + "\n".join(found)


def test_torch_is_pinned_by_version_alone():
    pins = [line.strip() for line in (REPO / "constraints.txt").read_text().splitlines()
            if re.match(r"torch\b(?!vision)", line.strip())]
    assert len(pins) == 1 and re.fullmatch(r"torch==\d+\.\d+\.\d+", pins[0]), pins
    makefile = (REPO / "Makefile").read_text()
    assert f"-c constraints.txt {pins[0]}" in makefile  # the Makefile installs exactly the constrained torch


def test_the_checker_catches_what_it_is_for():
    """The pattern is what keeps the install portable: each of these lines would break another machine."""
    for line in ["torch @ file:///opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
                 "--extra-index-url http://127.0.0.1/simple", "pip install --find-links /opt/wheels torch",
                 "torch @ https://example.org/torch.whl", "--index-url=https://mirror.local/simple"]:
        assert HOST_SPECIFIC.search(line), line
    assert not HOST_SPECIFIC.search("torch==2.13.0")
