"""Local job processes outlive a killed driver: a restarted one adopts them and never starts a second copy.

Real processes: a replica is a session leader with a child (as torchrun and
its worker are), tagged as `TorchXJobBackend` tags local jobs.
"""

import os
import subprocess
import sys
import time

import pytest

from noisy_student_operator import processes
from noisy_student_operator.api import JobStatus
from noisy_student_operator.backend import JobContext, TorchXJobBackend
from noisy_student_operator.core.layout import TEACHER, Stage
from noisy_student_operator.core.planner import JobState
from noisy_student_operator.core.render import JobRequest

pytestmark = pytest.mark.skipif(not processes.PROC.is_dir(), reason="needs /proc (Linux)")

JOB = "teacher-0123456789abcdef"


def start_replica(root, job=JOB):
    """What TorchX's local_cwd starts: a new session (torchrun) with a worker child."""
    env = {**os.environ, processes.ENV_TAG: processes.tag(root, job)}
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"
    return subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)


def wait_for(probe, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not (value := probe()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return value


def test_a_restarted_driver_adopts_leftover_processes_and_ends_them_on_cancel(tmp_path):
    replica = start_replica(tmp_path)
    try:
        pids = wait_for(lambda: (p := processes.find(processes.tag(tmp_path, JOB))) and len(p) == 2 and p)
        assert replica.pid in pids
        assert processes.find(processes.tag(tmp_path, "label-other")) == []
        # A new driver (the old one was SIGKILLed): it has no TorchX handle of the job.
        backend = TorchXJobBackend("local_cwd", local_root=tmp_path)
        record, context = JobStatus(name=JOB, stage=TEACHER, generation=0), JobContext(run="demo", namespace="ml")
        seen = backend.observe([record], context)[JOB]
        assert seen.state is JobState.RUNNING and "adopted" in seen.message
        request = JobRequest(name=JOB, stage=Stage(0, TEACHER), attempt=0, component="train")
        assert backend.submit(request, context) == f"adopted://{JOB}"  # nothing started
        assert sorted(processes.find(processes.tag(tmp_path, JOB))) == pids
        backend.cancel(record, context)
        replica.wait(timeout=20)
        wait_for(lambda: processes.find(processes.tag(tmp_path, JOB)) == [])  # the worker too
        assert backend.observe([record], context)[JOB].state is JobState.MISSING
    finally:
        processes.end([replica.pid], 9)
        replica.wait(timeout=20)


DRIVER = """
import subprocess, sys, threading
from noisy_student_operator import processes
script = "import subprocess, sys, time; subprocess.Popen(['sleep', '120']); time.sleep(120)"
replicas = []
# Started from a thread that ends at once: a parent-death signal bound to it would fire now.
thread = threading.Thread(target=lambda: replicas.append(processes.spawn(
    ["bash", "-c", sys.executable + ' -c "' + script + '"; echo bash outlived its child'])))
thread.start(); thread.join()
print(replicas[0].pid, flush=True)
threading.Event().wait()
"""


def test_replicas_end_with_the_driver_that_started_them_even_when_it_is_sigkilled(tmp_path):
    """A local runner or operator SIGKILLed mid-stage leaves no process of its jobs behind."""
    env = {**os.environ, processes.ENV_TAG: processes.tag(tmp_path, JOB)}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], env=env, stdout=subprocess.PIPE, text=True)
    try:
        guard = int(driver.stdout.readline())
        # guard, bash, python and sleep, tagged (the driver too: the tag came from its environment)
        tagged = wait_for(lambda: (p := processes.find(processes.tag(tmp_path, JOB))) and len(p) == 5 and p)
        time.sleep(1.0)  # the thread that asked for the replica has ended: the replica still runs
        assert processes.find(processes.tag(tmp_path, JOB)) == tagged and guard in tagged
        driver.kill()
        driver.wait(timeout=20)
        wait_for(lambda: processes.find(processes.tag(tmp_path, JOB)) == [], timeout=30)
    finally:
        driver.kill()
        processes.end(processes.find(processes.tag(tmp_path, JOB)), 9)


@pytest.mark.parametrize("code", [0, 2, 7])
def test_a_guarded_replica_exits_with_its_commands_code(code):
    assert processes.spawn(["sh", "-c", f"exit {code}"]).wait(timeout=60) == code


def test_a_cancelled_guarded_replica_ends_its_whole_group(tmp_path):
    env = {**os.environ, processes.ENV_TAG: processes.tag(tmp_path, JOB)}
    replica = processes.spawn(["bash", "-c", "sleep 120; echo after"], env=env)
    wait_for(lambda: len(processes.find(processes.tag(tmp_path, JOB))) == 3)
    os.killpg(replica.pid, 15)  # what TorchX's cancel does
    assert replica.wait(timeout=30) != 0
    wait_for(lambda: processes.find(processes.tag(tmp_path, JOB)) == [])


def test_a_cancelled_local_job_is_running_until_its_processes_are_gone(tmp_path):
    """TorchX reports a cancelled local app CANCELLED at once; the backend says so only once no
    process of the job is left (so the next attempt never starts beside the old one)."""
    from types import SimpleNamespace

    from torchx.specs import AppState

    class Runner:  # what TorchX's runner answers after a cancel
        def status(self, handle):
            return SimpleNamespace(state=AppState.CANCELLED, msg="")

    replica = start_replica(tmp_path)
    try:
        wait_for(lambda: len(processes.find(processes.tag(tmp_path, JOB))) == 2)
        backend = TorchXJobBackend("local_cwd", local_root=tmp_path, runner=Runner())
        backend._handles[JOB] = "local_cwd://torchx/" + JOB
        record, context = JobStatus(name=JOB, stage=TEACHER, generation=0), JobContext(run="demo", namespace="ml")
        seen = backend.observe([record], context)[JOB]
        assert seen.state is JobState.RUNNING and "still run" in seen.message
        processes.end([replica.pid])
        replica.wait(timeout=20)
        wait_for(lambda: processes.find(processes.tag(tmp_path, JOB)) == [])
        assert backend.observe([record], context)[JOB].state is JobState.CANCELLED
    finally:
        processes.end([replica.pid], 9)
        replica.wait(timeout=20)
