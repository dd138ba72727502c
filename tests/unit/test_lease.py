"""Stage leases: two local runners never run one stage at once (file:// store, in-memory jobs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from noisy_student_operator.api import JobStatus
from noisy_student_operator.backend import InMemoryJobBackend, JobContext
from noisy_student_operator.core.layout import TEACHER, Stage
from noisy_student_operator.core.planner import JobState
from noisy_student_operator.core.render import JobRequest
from noisy_student_operator.lease import LeasedBackend

CONTEXT = JobContext(run="demo", namespace="default")


def request(tmp_path, name="teacher-0123456789abcdef"):
    prefix = (tmp_path / "stages" / "teacher" / "0123456789abcdef").as_uri()
    return JobRequest(name, Stage(0, TEACHER), 0, "train", key="0123456789abcdef", prefix=prefix)


def record(req):
    return JobStatus(name=req.name, stage=req.stage.kind, generation=0, key=req.key, state="Running")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_second_runner_waits_while_the_first_holds_the_lease(tmp_path):
    clock = Clock()
    first_jobs, second_jobs = InMemoryJobBackend(), InMemoryJobBackend()
    first = LeasedBackend(first_jobs, clock=clock)
    second = LeasedBackend(second_jobs, clock=clock)
    req = request(tmp_path)
    first.submit(req, CONTEXT)
    handle = second.submit(req, CONTEXT)
    assert first_jobs.submissions == [req.name] and second_jobs.submissions == []
    assert handle.startswith("lease://")
    seen = second.observe([record(req)], CONTEXT)[req.name]
    assert seen.state is JobState.RUNNING and first.owner in seen.message

    # The first runner's job ends: its lease goes, and the second sees the job gone (then finds the marker).
    first_jobs.jobs[req.name] = JobState.SUCCEEDED
    assert first.observe([record(req)], CONTEXT)[req.name].state is JobState.SUCCEEDED
    assert not (tmp_path / "stages/teacher/0123456789abcdef/_LEASE.json").exists()
    assert second.observe([record(req)], CONTEXT)[req.name].state is JobState.MISSING


def test_a_lease_without_heartbeat_is_taken_over(tmp_path):
    clock = Clock()
    first_jobs, second_jobs = InMemoryJobBackend(), InMemoryJobBackend()
    first = LeasedBackend(first_jobs, ttl=30, clock=clock)
    second = LeasedBackend(second_jobs, ttl=30, clock=clock)
    # The first runner's host is another machine: only the heartbeat tells whether it lives.
    first.host = "elsewhere"
    req = request(tmp_path)
    first.submit(req, CONTEXT)
    clock.now += 10
    first.observe([record(req)], CONTEXT)  # heartbeat
    clock.now += 25
    second.submit(req, CONTEXT)
    assert second_jobs.submissions == []  # 25 s since the heartbeat: still held
    clock.now += 10
    second.submit(req, CONTEXT)
    assert second_jobs.submissions == [req.name]  # 35 s: stale, taken over
    # The first runner wakes up, finds the lease lost, and stops its copy.
    seen = first.observe([record(req)], CONTEXT)[req.name]
    assert seen.state is JobState.MISSING and first_jobs.cancelled == [req.name]


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    req = request(tmp_path)
    lease = tmp_path / "stages/teacher/0123456789abcdef/_LEASE.json"
    lease.parent.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    backend = LeasedBackend(InMemoryJobBackend())
    lease.write_text(json.dumps({"owner": "old", "host": backend.host, "pid": int(dead.stdout),
                                 "heartbeat": backend.clock()}))
    backend.submit(req, CONTEXT)
    assert backend.inner.submissions == [req.name]
    assert json.loads(lease.read_text())["pid"] == os.getpid()


def test_cancel_releases_the_lease_once_the_job_is_observed_stopped(tmp_path):
    backend = LeasedBackend(InMemoryJobBackend())
    req = request(tmp_path)
    lease = tmp_path / "stages/teacher/0123456789abcdef/_LEASE.json"
    backend.submit(req, CONTEXT)
    backend.inner.cancel = lambda job, context: backend.inner.cancelled.append(job.name)  # still stopping
    backend.cancel(record(req), CONTEXT)
    assert backend.inner.cancelled == [req.name]
    assert backend.observe([record(req)], CONTEXT)[req.name].state is JobState.RUNNING
    assert lease.exists()  # no other runner starts the stage beside the copy that is stopping
    backend.inner.jobs[req.name] = JobState.CANCELLED
    assert backend.observe([record(req)], CONTEXT)[req.name].state is JobState.CANCELLED
    assert not lease.exists()
