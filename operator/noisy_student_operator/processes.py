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

Leftovers are rare, though: `spawn` starts every replica under `guard`, which
ends the replica's processes when the driver dies (Linux's parent-death
signal), so a SIGKILLed driver leaves nothing running for long.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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


#: The one thread that starts replicas: Linux sends the parent-death signal when the *thread*
#: that forked a process exits, so replicas are never started from a short-lived thread (a
#: requeue timer's, a kopf worker's). It lives as long as the driver.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nso-local-jobs")


def spawn(args: list[str], **popen: Any) -> subprocess.Popen[bytes]:
    """Start a replica (`args`) under `guard`, in its own session, from the spawner thread."""
    command = [sys.executable, "-m", "noisy_student_operator.guard", str(os.getpid()), "--", *args]
    return _SPAWNER.submit(subprocess.Popen, command, start_new_session=True, **popen).result()


def create_scheduler(session_name: str, **kwargs: Any) -> Any:
    """TorchX's `local_cwd` scheduler, with every replica started by `spawn` (a scheduler factory)."""
    from torchx.schedulers.local_scheduler import CWDImageProvider, LocalScheduler

    class GuardedLocalScheduler(LocalScheduler):
        def run_local_job(self, args, env, stdout, stderr, cwd=None):  # type: ignore[no-untyped-def]
            return spawn(args, env=env, stdout=stdout, stderr=stderr, cwd=cwd)

    return GuardedLocalScheduler(session_name=session_name, image_provider_class=CWDImageProvider,
                                 cache_size=kwargs.get("cache_size", 100), extra_paths=kwargs.get("extra_paths"))
