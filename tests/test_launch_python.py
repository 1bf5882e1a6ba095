"""launch/train.sh runs u2moe's own interpreter, found without an activated environment."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a shell has without an activated environment: the system's python3, without DeepSpeed.
SYSTEM_PATH = "/usr/bin:/bin"


def _wrapper(path: Path) -> None:
    """An interpreter at `path` that is this test's (u2moe and DeepSpeed installed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    path.chmod(0o755)


def _checkout(root: Path) -> Path:
    """The launch scripts in a repository layout of their own."""
    shutil.copytree(REPO / "launch", root / "launch")
    return root


def _train_help(repo: Path, path: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    env.update(PATH=path, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(repo / "launch" / "train.sh"), "--gpus", "1", "--", "--help"],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("where", ["venv_beside_repo", "u2moe_on_path"])
def test_train_sh_finds_the_project_interpreter(tmp_path, where):
    repo = _checkout(tmp_path / "repo")
    path = SYSTEM_PATH
    if where == "venv_beside_repo":  # setup.sh's .venv, not activated
        _wrapper(repo / ".venv" / "bin" / "python")
    else:  # installed elsewhere: the environment of the `u2moe` command on PATH
        bin_dir = tmp_path / "env" / "bin"
        _wrapper(bin_dir / "python3")
        (bin_dir / "u2moe").write_text("#!/bin/sh\n")
        (bin_dir / "u2moe").chmod(0o755)
        path = f"{bin_dir}:{SYSTEM_PATH}"
    proc = _train_help(repo, path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "usage: u2moe train" in proc.stdout
