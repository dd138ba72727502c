"""How Volcano Jobs and their pods read as job states and failure messages (objects as the API returns them)."""

import pytest

import json

from noisy_student_operator.backend import TORCHX_NO_MESSAGE, local_failure, torchelastic_reply
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
    message, reason = job_failure(vcjob("Failed", reason="PodFailed", message="task teacher failed"), pods)
    assert reason is None  # an OOM kill is a failure: retried within retry.limit
    assert message.startswith("pod demo-g0-teacher-abc-teacher-0 container teacher exited with code 137 (OOMKilled)")
    assert "kubectl logs -n ml demo-g0-teacher-abc-teacher-0 -c teacher" in message
    assert "Volcano Job demo-g0-teacher-abc is Failed (PodFailed: task teacher failed)" in message
    assert TORCHX_NO_MESSAGE not in message


def test_failure_message_quotes_the_termination_message_and_evictions():
    written, reason = job_failure(vcjob("Failed"), [pod("p-0", 2, message="ConfigError: num_classes: 10 but ...")])
    assert "exited with code 2 (Error): ConfigError: num_classes: 10 but ..." in written
    assert reason == "InvalidConfig"  # the workloads exit 2 on a configuration error: not retried
    assert job_failure(vcjob("Failed"), []) == ("Volcano Job demo-g0-teacher-abc is Failed", None)


def test_evictions_preemptions_and_node_loss_are_disruptions():
    evicted = {"metadata": {"name": "p-1"}, "status": {"phase": "Failed", "reason": "Evicted",
                                                        "message": "The node was low on resource: memory."}}
    preempted = {"metadata": {"name": "p-1"}, "status": {"phase": "Failed", "conditions": [
        {"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
         "message": "Preempted in order to admit critical pod"}]}}
    lost = {"metadata": {"name": "p-1"}, "status": {"phase": "Failed", "reason": "NodeLost"}}
    for disrupted, says in ((evicted, "Evicted: The node was low"), (preempted, "PreemptionByScheduler: Preempted"),
                            (lost, "NodeLost")):
        # The gang's other pod exited 1 because its peer vanished: the disruption explains it.
        message, reason = job_failure(vcjob("Failed"), [pod("p-0", 1), disrupted])
        assert reason == "Disrupted" and message.startswith(f"pod p-1 was disrupted ({says}"), message


def test_local_failure_never_shows_torchx_placeholder():
    tail = "==> teacher/0/stderr.log <==\nTraceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory"
    message = local_failure(TORCHX_NO_MESSAGE, tail)
    assert TORCHX_NO_MESSAGE not in message
    assert message.startswith("a process exited with an error; the log ends:")
    assert message.endswith("RuntimeError: CUDA out of memory")
    assert local_failure(None, None) == "a process exited with an error"


CONFIG_ERROR = "ConfigError: batch_size: 1 is smaller than the 2 training processes"


def test_a_config_error_under_torchrun_is_invalid_config_by_its_termination_message():
    """torchrun's agent exits 1 whatever its worker's code; the worker's termination message says why."""
    written, reason = job_failure(vcjob("Failed"), [pod("p-0", 1, message=CONFIG_ERROR + "\n")])
    assert reason == "InvalidConfig", written
    assert f"exited with code 1 (Error): {CONFIG_ERROR}; see `kubectl logs" in written
    assert job_failure(vcjob("Failed"), [pod("p-0", 1, message=f"RuntimeError: {CONFIG_ERROR}")])[1] is None


def test_a_local_config_error_is_read_from_torchruns_reply_file():
    """TorchX's local scheduler hands over the replica's TORCHELASTIC_ERROR_FILE as `structured_error_msg`:
    torchrun's agent copied its failed worker's record there, with the worker's exit code."""
    copied = {"message": {"message": CONFIG_ERROR, "errorCode": 2,
                          "extraInfo": {"py_callstack": "Traceback ...", "timestamp": "1767225600"}}}
    assert torchelastic_reply(json.dumps(copied)) == CONFIG_ERROR
    assert torchelastic_reply(json.dumps({"message": "a newer format: a plain string"})) == "a newer format: a plain string"
    assert torchelastic_reply(TORCHX_NO_MESSAGE) is None and torchelastic_reply("not json") is None
    assert torchelastic_reply(None) is None and torchelastic_reply(json.dumps({"other": 1})) is None


def volcano_resource(name, tasks):
    return {"metadata": {"name": name}, "spec": {"tasks": [{"name": t, "replicas": r} for t, r in tasks]}}


def test_names_volcano_derives_are_checked_before_submit():
    from noisy_student_operator.core.planner import JobSubmitError
    from noisy_student_operator.volcano import check_names

    check_names(volcano_resource("label-0123456789abcdef-12", [("label", 1024)]))
    with pytest.raises(JobSubmitError, match="DNS-1035") as refused:
        check_names(volcano_resource("2024-exp", [("teacher", 1)]))
    assert refused.value.permanent
    with pytest.raises(JobSubmitError, match="pod name 'x+-label-1023'"):
        check_names(volcano_resource("x" * 53, [("label", 1024)]))
    # TorchX makes one task per replica (`label-<i>`, 1 replica); the webhook names the pod after
    # the task's position: `<job>-label-1023-1023`.
    torchx_tasks = [(f"label-{i}", 1) for i in range(1024)]
    check_names(volcano_resource("label-0123456789abcdef-12", torchx_tasks))
    with pytest.raises(JobSubmitError, match="pod name 'x+-label-1023-1023'"):
        check_names(volcano_resource("x" * 48, torchx_tasks))


def test_every_job_name_fits_for_any_admitted_run_name_and_large_attempts():
    """Job names derive from stage keys, not from the run name: any run name fits."""
    from noisy_student_operator.core.layout import BALANCE, LABEL, PREPARE, STUDENT, TEACHER, Stage, job_name
    from noisy_student_operator.volcano import check_names

    for kind in (PREPARE, TEACHER, LABEL, BALANCE, STUDENT):
        name = job_name(Stage(3, kind), "f" * 16, 10**6)
        check_names(volcano_resource(name, [(kind, 1024)]))  # 1,024 label shards or nodes


def test_run_names_are_dns_1035_labels():
    from noisy_student_operator.api import RunFileError, parse_run
    from noisy_student_operator.crd import render_crd

    rules = [r["rule"] for r in render_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
             ["x-kubernetes-validations"]]
    assert any("self.metadata.name.matches(" in rule for rule in rules)
    document = {"apiVersion": "noisystudent.dev/v1alpha1", "kind": "NoisyStudentRun",
                "metadata": {"name": "2024-exp"},
                "spec": {"data": {"labeled": "s3://d/l.tar", "unlabeled": "s3://d/u.tar",
                                  "validation": "s3://d/v.tar", "numClasses": 10},
                         "artifacts": {"uri": "s3://runs/"}, "teacher": {"model": "resnet18"},
                         "students": [{"model": "resnet18"}]}}
    with pytest.raises(RunFileError, match="metadata.name"):
        parse_run(document)


def test_pending_reason_is_the_first_waiting_pods_reason():
    from noisy_student_operator.volcano import pending_reason

    job = {"metadata": {"name": "j"}, "spec": {"queue": "gpu"}, "status": {"state": {"phase": "Pending"}}}
    pulling = {"metadata": {"name": "j-teacher-0"}, "status": {"phase": "Pending", "containerStatuses": [
        {"name": "teacher", "state": {"waiting": {"reason": "ImagePullBackOff",
                                                  "message": 'Back-off pulling image "nope:1"'}}}]}}
    unschedulable = {"metadata": {"name": "j-teacher-1"}, "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}}
    assert pending_reason(job, [unschedulable, pulling]) == 'pod j-teacher-0: ImagePullBackOff: Back-off pulling image "nope:1"'
    assert pending_reason(job, [unschedulable]) == (
        "pod j-teacher-1 is not scheduled (Unschedulable): 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")
    assert "queue gpu" in pending_reason(job, [])


def test_pending_reason_without_pods_quotes_volcano_on_the_podgroup():
    """The gang does not fit: Volcano creates no pod; its PodGroup's Unschedulable condition (or,
    before the gang is admitted, its latest Unschedulable Event) says why."""
    from noisy_student_operator.volcano import pending_reason

    job = {"metadata": {"name": "j"}, "spec": {"queue": "default"}, "status": {"state": {"phase": "Pending"}}}
    podgroup = {"status": {"phase": "Pending", "conditions": [
        {"type": "Unschedulable", "status": "True", "reason": "NotEnoughResources",
         "message": "1/1 tasks in gang unschedulable: 0/2 nodes are unavailable: 2 Insufficient nvidia.com/gpu."}]}}
    assert pending_reason(job, [], podgroup) == (
        "Volcano cannot schedule the job (NotEnoughResources: 1/1 tasks in gang unschedulable: "
        "0/2 nodes are unavailable: 2 Insufficient nvidia.com/gpu.)")
    events = [{"reason": "Unschedulable", "message": "queue resource quota insufficient",
               "lastTimestamp": "2026-01-01T00:00:01Z"},
              {"reason": "Unschedulable", "message": "resource in cluster is overused: overused nvidia.com/gpu",
               "lastTimestamp": "2026-01-01T00:00:02Z"},
              {"reason": "Scheduled", "message": "pod group is ready", "lastTimestamp": "2026-01-01T00:00:03Z"}]
    assert pending_reason(job, [], {"status": {"phase": "Pending"}}, events) == (
        "Volcano cannot schedule the job (resource in cluster is overused: overused nvidia.com/gpu)")
    assert "queue default" in pending_reason(job, [], None, [])
