"""The first process of every `local_cwd` replica: it ends the replica when its driver dies.

`python -m noisy_student_operator.guard PARENT_PID -- COMMAND...` asks Linux to
send it SIGTERM when the thread that started it exits (`PR_SET_PDEATHSIG`;
`processes.spawn` starts every replica from one thread that lives as long as
the driver), exits at once if its parent is already gone, then runs COMMAND
in its own process group (TorchX made it a session leader) and exits with
COMMAND's code. On SIGTERM — the driver died, or TorchX or `processes.end`
cancels the job — it signals the whole group (bash, torchrun, its workers),
waits `GRACE_SECONDS` for COMMAND to exit, then kills the group.

So a SIGKILLed local runner or operator leaves no job process behind, and
its restart never finds a second copy running. Only the standard library is
imported: the guard is started once per replica.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_PDEATHSIG = 1
#: Seconds between SIGTERM and SIGKILL of the replica's process group: less than TorchX's own
#: 10 s, after which it SIGKILLs only the guard (its group would be left to itself).
GRACE_SECONDS = 8.0


def die_with_parent(parent: int) -> None:
    """SIGTERM when the parent (thread) dies; exit now if it already has."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        sys.exit(f"guard: the driver (pid {parent}) is gone; not starting the job")


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: python -m noisy_student_operator.guard PARENT_PID -- COMMAND...")
    die_with_parent(int(argv[0]))
    group = os.getpgrp()
    stopping: list[float] = []

    def stop(signum: int, _frame: object) -> None:
        if not stopping:
            stopping.append(time.monotonic() + GRACE_SECONDS)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group's signal is not for us
            os.killpg(group, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    child = subprocess.Popen(argv[2:])
    while True:
        try:
            code = child.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            if stopping and time.monotonic() > stopping[0]:
                os.killpg(group, signal.SIGKILL)  # this guard included
    if stopping:
        os.killpg(group, signal.SIGKILL)  # whatever COMMAND left behind (a forked torchrun's workers)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
