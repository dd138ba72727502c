"""The local runner confirms its cancels: suspended or interrupted, it stops only once the cancelled
job's processes are gone, and its status file says Cancelled, never that a stopped job still runs."""

import io

import pytest
from rich.console import Console

from noisy_student_operator.api import JobStatus, RunStatus, parse_run
from noisy_student_operator.backend import InMemoryJobBackend
from noisy_student_operator.core.layout import TEACHER, Stage, job_name
from noisy_student_operator.core.planner import JobObservation, JobState
from noisy_student_operator.local import LocalRunner


class SlowStopBackend(InMemoryJobBackend):
    """A cancelled job keeps running for `passes` observations (TorchX waits, processes exit);
    `interrupt_after` observations raise KeyboardInterrupt (Ctrl-C in the middle of a pass)."""

    def __init__(self, passes=2, interrupt_after=None):
        super().__init__()
        self.passes = passes
        self.interrupt_after = interrupt_after
        self.observations = 0
        self.stopping: dict[str, int] = {}

    def observe(self, jobs, context):
        self.observations += 1
        if self.interrupt_after is not None and self.observations > self.interrupt_after:
            self.interrupt_after = None
            raise KeyboardInterrupt
        for name, left in list(self.stopping.items()):
            if left == 0:
                self.jobs[name] = JobState.CANCELLED
                del self.stopping[name]
            else:
                self.stopping[name] = left - 1
        return {j.name: JobObservation(self.jobs.get(j.name, JobState.MISSING)) for j in jobs}

    def cancel(self, job, context):
        self.cancelled.append(job.name)
        if self.jobs.get(job.name) is JobState.RUNNING:
            self.stopping.setdefault(job.name, self.passes)


def make_runner(tmp_path, backend, suspend=False):
    run = parse_run({"apiVersion": "noisystudent.dev/v1alpha1", "kind": "NoisyStudentRun",
                     "metadata": {"name": "demo", "namespace": "ml"},
                     "spec": {"data": {"labeled": "file:///d/l.tar", "unlabeled": "file:///d/u.tar",
                                       "validation": "file:///d/v.tar", "numClasses": 10},
                              "artifacts": {"uri": tmp_path.as_uri() + "/"}, "teacher": {"model": "resnet18"},
                              "students": [{"model": "resnet18"}], "suspend": suspend,
                              "scheduler": {"name": "local_cwd"}}})
    out = io.StringIO()
    runner = LocalRunner(run, console=Console(file=out, width=200), poll_seconds=0.0, backend=backend)
    return runner, out


def teacher_job(runner):
    stage = Stage(0, TEACHER)
    return job_name(stage, runner.layout.key(stage), 0)


def test_a_suspended_local_run_stops_once_its_cancelled_job_is_confirmed_stopped(tmp_path):
    backend = SlowStopBackend(passes=2)
    runner, _ = make_runner(tmp_path, backend, suspend=True)
    name = teacher_job(runner)
    backend.jobs[name] = JobState.RUNNING  # started by the last invocation, which was not suspended
    runner.status_file.save(RunStatus(jobs=[JobStatus(name=name, stage=TEACHER, generation=0, key=name.split("-")[1],
                                                      state="Running")]))
    status = runner.execute()
    assert [(j.name, j.state) for j in status.jobs] == [(name, "Cancelled")]
    assert runner.status_file.load().jobs[0].state == "Cancelled"
    assert backend.cancelled == [name] * 3  # asked, then asked again while it was still stopping
    assert backend.submissions == []


def test_an_interrupted_local_run_records_its_job_cancelled_once_stopped(tmp_path):
    backend = SlowStopBackend(passes=2, interrupt_after=1)
    runner, out = make_runner(tmp_path, backend)
    name = teacher_job(runner)
    with pytest.raises(KeyboardInterrupt):
        runner.execute()  # pass 1 submits the teacher; Ctrl-C during pass 2
    assert backend.submissions == [name]
    saved = runner.status_file.load()
    assert [(j.name, j.state) for j in saved.jobs] == [(name, "Cancelled")]
    assert f"Interrupted; cancelled {name}. Run the same command again to resume." in out.getvalue()
