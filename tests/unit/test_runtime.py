"""Cores shared by the workload processes of one host (real advisory locks, real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from noisy_student_workloads.runtime import CoreShare, available_cores


def test_processes_on_one_host_divide_the_cores(tmp_path: Path) -> None:
    first = CoreShare(str(tmp_path))
    assert first.holders() == 1 and first.budget() == available_cores()
    second = CoreShare(str(tmp_path))
    assert first.slot != second.slot
    assert first.holders() == second.holders() == 2
    assert first.budget() == max(1, available_cores() // 2)
    second.close()
    assert first.holders() == 1


def test_a_slot_is_freed_when_its_process_dies(tmp_path: Path) -> None:
    code = f"from noisy_student_workloads.runtime import CoreShare; s = CoreShare({str(tmp_path)!r}); print(s.slot)"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "0"
    share = CoreShare(str(tmp_path))
    assert share.slot == 0 and share.holders() == 1  # the dead child's slot is free again


def test_workers_only_with_a_core_to_spare(tmp_path: Path) -> None:
    share = CoreShare(str(tmp_path))
    threads, workers = share.plan(max_workers=2)
    budget = share.budget()
    assert threads + workers == max(budget, 1 + workers)
    assert workers == max(0, min(2, budget - 1))
    crowd = [CoreShare(str(tmp_path)) for _ in range(available_cores())]
    assert share.plan(max_workers=2) == (1, 0)  # more processes than cores: one thread each, no workers
    for other in crowd:
        other.close()


def test_the_slots_serve_every_user_of_the_host(tmp_path: Path, monkeypatch) -> None:
    # one directory per host, as /tmp is: another user's workload takes a slot and counts the others'
    # (before, the directory and slot files kept the creator's umask and a second user's workload failed
    # with a PermissionError)
    slots = tmp_path / "slots"
    monkeypatch.setenv("NSO_CPU_SLOTS_DIR", str(slots))
    umask = os.umask(0o022)
    try:
        first = CoreShare()
    finally:
        os.umask(umask)
    assert slots.stat().st_mode & 0o7777 == 0o1777
    assert (slots / "slot-000").stat().st_mode & 0o777 == 0o666

    real_open = os.open

    def another_user(path, flags, *args):  # may read the first user's files, not write them
        if Path(path).parent == slots and Path(path).exists() and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", another_user)
    second = CoreShare()
    assert second.slot == 1 and second.holders() == first.holders() == 2


def test_a_process_without_a_slot_still_counts_the_holders(tmp_path: Path, monkeypatch) -> None:
    # every slot taken (or none this user may open): no share of its own, but the others' count
    first = CoreShare(str(tmp_path))
    monkeypatch.setattr("noisy_student_workloads.runtime.SLOTS", 1)
    late = CoreShare(str(tmp_path))
    assert late.slot is None and late.holders() == 1 and late.budget() == available_cores()
    first.close()
