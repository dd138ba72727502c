"""How Volcano Jobs and their pods read as job states and failure messages (objects as the API returns them)."""

import pytest

from noisy_student_operator.backend import TORCHX_NO_MESSAGE, local_failure
from noisy_student_operator.core.planner import JobState
from noisy_student_operator.volcano import job_failure, job_state


def vcjob(phase, deleting=False, reason=None, message=None):
    meta = {"name": "demo-g0-teacher-abc", "namespace": "ml"}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    state = {"phase": phase}
    if reason:
        state["reason"] = reason
    if message:
        state["message"] = message
    return {"metadata": meta, "status": {"state": state}}


def pod(name, exit_code, reason="Error", message=None, phase="Failed"):
    terminated = {"exitCode": exit_code, "reason": reason}
    if message:
        terminated["message"] = message
    return {"metadata": {"name": name}, "status": {"phase": phase, "containerStatuses": [
        {"name": "teacher", "state": {"terminated": terminated}}]}}


@pytest.mark.parametrize(("phase", "state"), [
    ("Pending", JobState.PENDING), ("Running", JobState.RUNNING), ("Aborting", JobState.RUNNING),
    ("Terminating", JobState.RUNNING), ("Restarting", JobState.RUNNING), ("Completing", JobState.RUNNING),
    ("Completed", JobState.SUCCEEDED), ("Failed", JobState.FAILED), ("Terminated", JobState.FAILED),
    ("Aborted", JobState.CANCELLED),
])
def test_phases(phase, state):
    assert job_state(vcjob(phase)) is state


def test_aborting_and_a_job_being_deleted_still_run():
    assert job_state(vcjob("Aborting")).active
    assert job_state(vcjob("Pending", deleting=True)) is JobState.RUNNING
    assert job_state(vcjob("Completed", deleting=True)) is JobState.SUCCEEDED


def test_failure_message_names_the_pod_exit_code_reason_and_a_logs_hint():
    pods = [pod("demo-g0-teacher-abc-teacher-1", 0, "Completed", phase="Succeeded"),
            pod("demo-g0-teacher-abc-teacher-0", 137, "OOMKilled")]
    message = job_failure(vcjob("Failed", reason="PodFailed", message="task teacher failed"), pods)
    assert message.startswith("pod demo-g0-teacher-abc-teacher-0 container teacher exited with code 137 (OOMKilled)")
    assert "kubectl logs -n ml demo-g0-teacher-abc-teacher-0 -c teacher" in message
    assert "Volcano Job demo-g0-teacher-abc is Failed (PodFailed: task teacher failed)" in message
    assert TORCHX_NO_MESSAGE not in message


def test_failure_message_quotes_the_termination_message_and_evictions():
    written = job_failure(vcjob("Failed"), [pod("p-0", 2, message="ValueError: spec.data.numClasses must be 10")])
    assert "exited with code 2 (Error): ValueError: spec.data.numClasses must be 10" in written
    evicted = {"metadata": {"name": "p-0"}, "status": {"phase": "Failed", "reason": "Evicted",
                                                        "message": "The node was low on resource: memory."}}
    assert job_failure(vcjob("Failed"), [evicted]).startswith("pod p-0 failed (Evicted): The node was low")
    assert job_failure(vcjob("Failed"), []) == "Volcano Job demo-g0-teacher-abc is Failed"


def test_local_failure_never_shows_torchx_placeholder():
    tail = "==> teacher/0/stderr.log <==\nTraceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory"
    message = local_failure(TORCHX_NO_MESSAGE, tail)
    assert TORCHX_NO_MESSAGE not in message
    assert message.startswith("a process exited with an error; the log ends:")
    assert message.endswith("RuntimeError: CUDA out of memory")
    assert local_failure(None, None) == "a process exited with an error"
