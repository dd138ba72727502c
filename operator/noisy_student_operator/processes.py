"""Local job processes left behind by a driver that died: find them, adopt them, end them.

TorchX's `local_cwd` scheduler starts each replica in its own session, so its
processes outlive the runner or operator that started them (SIGKILL, a
crash, a closed terminal), and their TorchX handles die with it. Every local
job therefore carries a tag in its environment (`NSO_LOCAL_JOB=<root>::<job
name>`), inherited by `torchrun` and its workers. A restarted driver that does
not know a job asks `find` for processes with its tag: while any runs, the job
is adopted (reported running, never started a second time); `end` stops them
(SIGTERM to their process groups).

Linux only (it reads `/proc/<pid>/environ`); elsewhere nothing is found.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV_TAG = "NSO_LOCAL_JOB"
PROC = Path("/proc")


def tag(root: os.PathLike[str] | str, job: str) -> str:
    """The tag of `job` started under the local root `root`."""
    return f"{Path(root).resolve()}::{job}"


def find(job_tag: str, proc: Path = PROC) -> list[int]:
    """Live processes (not zombies) whose environment carries `job_tag`, this process excluded."""
    wanted = f"{ENV_TAG}={job_tag}".encode()
    found = []
    if not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if wanted not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if state != "Z":
            found.append(int(entry.name))
    return sorted(found)


def end(pids: list[int], sig: int = signal.SIGTERM) -> None:
    """Signal the process groups of `pids` (a replica's session: torchrun and its workers)."""
    groups = set()
    for pid in pids:
        try:
            groups.add(os.getpgid(pid))
        except ProcessLookupError:
            continue
    for group in groups:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            continue
