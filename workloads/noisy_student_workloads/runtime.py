"""How many CPU threads and data-loader workers a workload process should use.

The cores a process really has are the fewer of its CPU affinity and its
cgroup's CPU quota (a container limit). Workload processes on the same host
share them: label replicas that ``local_cwd`` starts side by side, or the
ranks of a training job. Each process holds one *slot* — an advisory lock
on a file in a host-wide directory — for as long as it runs, and divides
the cores by the number of slots held. Locks vanish with their process, so
a crashed replica never keeps its share. The directory serves every user of
the host, as ``/tmp`` does. Pods in a cluster each have their
own ``/dev/shm`` and count only themselves.

Example::

    python -c "from noisy_student_workloads.runtime import CoreShare; \
s = CoreShare(); print(s.cores(), s.holders(), s.budget())"
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import tempfile

SLOTS = 256


def available_cores() -> int:
    """CPUs this process may run on: its affinity, capped by the cgroup v2 ``cpu.max`` quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _slot_dir() -> str:
    base = os.environ.get("NSO_CPU_SLOTS_DIR")
    if not base:
        shm = "/dev/shm"
        base = os.path.join(shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir(),
                            "noisy-student-cpu")
    try:
        os.makedirs(base)
    except FileExistsError:
        return base
    os.chmod(base, 0o1777)  # the host's, as /tmp is: every user's workloads take slots in it
    return base


def _open_slot(path: str) -> int | None:
    """A slot file, opened read-only (``flock`` needs no more), so that one another user created serves too;
    created readable by all if missing. None if this user cannot open it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
    except PermissionError:  # another user's, in a directory that protects them from O_CREAT
        try:
            return os.open(path, os.O_RDONLY)
        except OSError:
            return None
    with contextlib.suppress(PermissionError):  # the umask's share; only the owner may change it
        os.fchmod(fd, 0o666)
    return fd


class CoreShare:
    """This process's share of the host's cores among the workload processes running on it."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory or _slot_dir()
        self._fd: int | None = None
        self.slot: int | None = None
        for i in range(SLOTS):
            fd = _open_slot(os.path.join(self.directory, f"slot-{i:03d}"))
            if fd is None:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self._fd, self.slot = fd, i
            break

    def cores(self) -> int:
        return available_cores()

    def holders(self) -> int:
        """Workload processes holding a slot on this host, this one included."""
        held, mine = (0, None) if self.slot is None else (1, f"slot-{self.slot:03d}")
        for name in os.listdir(self.directory):
            if not name.startswith("slot-") or name == mine:
                continue
            try:
                fd = os.open(os.path.join(self.directory, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                held += 1
            finally:
                os.close(fd)
        return max(1, held)

    def budget(self) -> int:
        """Cores for this process: the host's divided among the slot holders (at least one)."""
        return max(1, self.cores() // self.holders())

    def plan(self, max_workers: int) -> tuple[int, int]:
        """``(torch threads, data-loader workers)`` within this process's budget.

        Workers decode and augment in parallel with compute, which pays only
        with a core to spare: ``min(max_workers, budget - 1)`` of them, and
        the remaining cores for compute.
        """
        budget = self.budget()
        workers = max(0, min(max_workers, budget - 1))
        return max(1, budget - workers), workers

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd, self.slot = None, None
