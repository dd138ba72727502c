"""Cores shared by the workload processes of one host (real advisory locks, real processes)."""

from __future__ import annotations

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
