"""Facts about the machine and the checkout that reports (parity, bench) record, so a
result can be traced back to where it was measured."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

__all__ = ["cpu_model", "git_commit", "run_text"]

_PACKAGE = Path(__file__).resolve().parent


def run_text(command: list[str], cwd: str | Path | None = None) -> str | None:
    """The stripped stdout of command, or None when it cannot run or fails."""
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=10, cwd=cwd, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def cpu_model() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout fusedattn runs from; (None, None) outside one.
    dirty: tracked files differ from the commit."""
    commit = run_text(["git", "rev-parse", "HEAD"], cwd=_PACKAGE)
    if not commit:
        return None, None
    status = run_text(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_PACKAGE)
    return commit, bool(status)
