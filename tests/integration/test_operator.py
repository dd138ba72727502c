"""The operator against a real control plane with Volcano and a real S3 server.

One cluster (scripts/dev-cluster, its API server with an audit log), one S3
server and one operator process serve the whole module; every test works in
its own namespace. The operator runs exactly as in a cluster (`noisy-student
operator --all-namespaces`) and creates real `batch.volcano.sh` Jobs, which
Volcano's webhooks admit and its controller turns into pods on the fast test
kubelet's nodes; the harness (tests/operator_harness.py) ends those pods as
the workloads would, after writing the completion markers they would write,
and Volcano derives each Job's phase.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kube_server import ApiServer, ensure_namespace, find_kubectl
from operator_harness import (
    Harness,
    OperatorProcess,
    api_client,
    apply_crds,
    is_operator_request,
    job_attempt,
    job_phase,
    job_stage,
    load_permissions,
    operator_kubeconfig,
    operator_permissions,
    read_audit,
    run_crd,
    save_permissions,
    wait_for,
)

from noisy_student_operator.core.layout import LABEL, TEACHER, Stage

pytestmark = pytest.mark.integration

SECRET_NAME = "s3-credentials"
#: Generous for a loaded 2-core machine; each step normally takes about a second.
STEP = 60.0


# ----------------------------------------------------------------------------- fixtures


@dataclass
class Cluster:
    server: ApiServer
    client: Any  # the harness's kubernetes ApiClient
    audit_log: Path


@pytest.fixture(scope="module")
def cluster(kube_api_with_audit: ApiServer) -> Cluster:
    """The cluster with an audit log and the NoisyStudentRun CRD (Volcano's CRDs come with the cluster)."""
    assert kube_api_with_audit.audit_log is not None
    client = api_client(kube_api_with_audit.kubeconfig)
    apply_crds(client, [run_crd()])
    return Cluster(kube_api_with_audit, client, kube_api_with_audit.audit_log)


@pytest.fixture(scope="module")
def operator(cluster, s3_server, tmp_path_factory) -> Iterator[OperatorProcess]:
    directory = tmp_path_factory.mktemp("operator")
    kubeconfig = operator_kubeconfig(cluster.server.kubeconfig, cluster.server.run_dir / "pki", directory)
    process = OperatorProcess(kubeconfig, directory / "operator.log", env=s3_server.env())
    process.start()
    yield process
    process.stop()


def _whole_module_ran(request: pytest.FixtureRequest) -> bool:
    """True when no test of this module was deselected (no -k/-m, no node ids) and none failed."""
    config = request.config
    selective = config.option.keyword or config.option.markexpr or any("::" in a for a in config.args)
    return not selective and request.session.testsfailed == 0


@pytest.fixture(scope="module")
def recorded_permissions(cluster, request):
    """After the module: the operator's requests from the audit log, checked against the fixture file.

    Every request must be listed; after a full run, every listed permission must also have been
    used, so the file (and the chart's RBAC, which a chart test compares with it) cannot drift.
    """
    yield
    observed = operator_permissions(read_audit(cluster.audit_log))
    if os.environ.get("NSO_UPDATE_PERMISSIONS"):
        save_permissions(observed if _whole_module_ran(request) else observed | load_permissions())
        return
    listed = load_permissions()
    missing = observed - listed
    assert not missing, (
        f"the operator made requests not in tests/fixtures/operator_permissions.json: {sorted(missing)}; "
        "regenerate it with NSO_UPDATE_PERMISSIONS=1"
    )
    if _whole_module_ran(request):
        unused = listed - observed
        assert not unused, (
            f"tests/fixtures/operator_permissions.json lists permissions the operator never used: "
            f"{sorted(unused)}; regenerate it with NSO_UPDATE_PERMISSIONS=1"
        )


@pytest.fixture
def h(cluster, operator, s3_env, recorded_permissions) -> Harness:
    if not operator.running:  # an earlier test failed while the operator was down
        operator.start()
    return Harness(cluster.client, operator)


@pytest.fixture
def ns(cluster: Cluster) -> Iterator[str]:
    """A fresh namespace, deleted afterwards (with its runs, jobs and pods) so that nodes stay free."""
    from kubernetes import client as k8s

    name = f"t-{uuid.uuid4().hex[:8]}"
    ensure_namespace(cluster.client, name)
    yield name
    k8s.CoreV1Api(cluster.client).delete_namespace(name)


def spec(s3_prefix: str, students: int = 2, prepare: bool = False, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"numClasses": 10, "imageSize": 28}
    if prepare:
        data["prepare"] = {"source": "mnist", "labelsPerClass": 40, "validationSize": 1000}
    else:
        data.update(labeled="s3://datasets/mnist/labeled-{000000..000001}.tar",
                    unlabeled="s3://datasets/mnist/unlabeled-{000000..000003}.tar",
                    validation="s3://datasets/mnist/test-000000.tar")
    models = ["resnet18", "resnet34", "resnet50"]
    result = {
        "data": data,
        "artifacts": {"uri": s3_prefix, "secretRef": {"name": SECRET_NAME}},
        "teacher": {"model": models[0], "epochs": 1},
        "students": [{"model": models[min(i + 1, 2)]} for i in range(students)],
        "resources": {"labelShards": 2},
        "retry": {"limit": 2, "backoffSeconds": 1, "maxBackoffSeconds": 2},
    }
    result.update(overrides)
    return result


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def is_true(status: dict[str, Any], type_: str) -> bool:
    return condition(status, type_).get("status") == "True"


def drive_to_end(h: Harness, ns: str, run: str, stages: int, on_job=None) -> list[dict[str, Any]]:
    """Play Volcano and the workloads for every stage: Running, then marker + Completed."""
    seen: set[str] = set()
    layout = h.layout(ns, run)
    jobs = []
    for index in range(stages):
        job = h.next_job(ns, run, seen, STEP)
        name = job["metadata"]["name"]
        h.set_phase(ns, name, "Running")
        h.wait_run(ns, run, lambda s: any(j["name"] == name and j["state"] == "Running" for j in s.get("jobs", [])),
                   STEP, f"job {name} Running in status")
        if on_job:
            on_job(index, job)
        h.complete(ns, job, layout)
        jobs.append(job)
    return jobs


# ----------------------------------------------------------------------------- (a) every stage


def test_run_goes_through_every_stage_to_succeeded(h, ns, s3_prefix):
    run = "every-stage"
    h.create_run(ns, run, spec(s3_prefix, students=2, prepare=True))
    names = h.job_names(ns, run)
    assert len(names) == 1 + 1 + 2 * 3 + 1  # prepare, teacher, 2 x (label, balance, student), export

    def check_stage(index: int, job: dict[str, Any]) -> None:
        stage = job_stage(job)
        expected = {"prepare": "Preparing", "teacher": "Training", "label": "Labeling",
                    "balance": "Balancing", "student": "Training", "export": "Exporting"}[stage.kind]
        status = h.wait_run(ns, run, lambda s: s.get("stage") == expected and s.get("generation") == stage.generation,
                            STEP, f"stage {expected} of generation {stage.generation}")
        assert is_true(status, "Progressing") and not is_true(status, "Ready")

    jobs = drive_to_end(h, ns, run, len(names), on_job=check_stage)
    assert [j["metadata"]["name"] for j in jobs] == names

    status = h.wait_run(ns, run, lambda s: s.get("stage") == "Succeeded", STEP, "Succeeded")
    body = h.get_run(ns, run)
    assert status["observedGeneration"] == body["metadata"]["generation"]
    assert status["generation"] == 2
    assert [g["generation"] for g in status["generations"]] == [0, 1, 2]
    assert [g["model"] for g in status["generations"]] == ["resnet18", "resnet34", "resnet50"]
    assert [g["top1"] for g in status["generations"]] == [0.7, 0.75, 0.8]
    assert status["generations"][1]["imagesUsed"] == 3000
    assert status["teacherTop1"] == 0.8
    last = status["generations"][2]
    assert last["checkpoint"].endswith(f"/{ns}/stages/student/{last['key']}/checkpoint.pt")
    for type_, value in {"Ready": "True", "Succeeded": "True", "Progressing": "False", "Failed": "False",
                         "Suspended": "False"}.items():
        assert condition(status, type_)["status"] == value, type_
        assert condition(status, type_)["observedGeneration"] == body["metadata"]["generation"]
    assert condition(status, "Succeeded")["reason"].isalpha()
    assert sorted(j["name"] for j in status["jobs"]) == sorted(names)
    assert all(j["state"] == "Succeeded" for j in status["jobs"])
    assert sorted(j["metadata"]["name"] for j in h.jobs(ns, run)) == sorted(names)  # nothing submitted twice

    def reasons() -> Counter[str]:
        events = h.core.list_namespaced_event(ns).items
        return Counter(e.reason for e in events if e.involved_object.name == run)

    seen = wait_for(lambda: reasons() if reasons()["RunSucceeded"] else None, STEP, "the RunSucceeded Event")
    assert seen["JobSubmitted"] == len(names) and seen["Promoted"] == 2 and seen["StageCompleted"] >= 1


# ----------------------------------------------------------------------------- (b) restarts


def test_operator_killed_at_several_moments_never_duplicates_or_redoes_a_stage(h, ns, s3_prefix):
    run = "restarts"
    h.operator.kill()
    h.create_run(ns, run, spec(s3_prefix, students=2))
    names = h.job_names(ns, run)
    h.operator.start()  # 1: the run was created while no operator ran
    seen: set[str] = set()
    layout = h.layout(ns, run)
    for index in range(len(names)):
        job = h.next_job(ns, run, seen, STEP)
        name = job["metadata"]["name"]
        moment = index % 3
        if moment == 0:
            h.operator.restart()  # 2: right after the job was created, maybe before its status was written
            h.set_phase(ns, name, "Running")
            h.complete(ns, job, layout)
        elif moment == 1:
            h.set_phase(ns, name, "Running")
            h.complete(ns, job, layout)
            h.operator.restart()  # 3: the job completed; the next job may or may not be submitted yet
        else:
            h.set_phase(ns, name, "Running")
            h.wait_run(ns, run, lambda s: any(j["name"] == name and j["state"] == "Running" for j in s.get("jobs", [])),
                       STEP, f"{name} Running")
            h.operator.kill()  # 4: killed while the job runs; it completes while no operator watches
            h.complete(ns, job, layout)
            h.operator.start()
    status = h.wait_run(ns, run, lambda s: s.get("stage") == "Succeeded", STEP, "Succeeded")
    jobs = h.jobs(ns, run)
    assert sorted(j["metadata"]["name"] for j in jobs) == sorted(names)
    per_stage = Counter((job_stage(j), job_attempt(j)) for j in jobs)
    assert set(per_stage.values()) == {1}
    assert [g["generation"] for g in status["generations"]] == [0, 1, 2]
    # A job created just before a kill and completed before the restart is never recorded in
    # status (the planner only records what it submits); its stage still counts as done.
    assert {j["name"] for j in status["jobs"]} <= set(names)
    assert all(j["state"] == "Succeeded" for j in status["jobs"]), [(j["name"], j["state"]) for j in status["jobs"]]
    assert h.operator.starts >= len(names)


# ----------------------------------------------------------------------------- (c) delete


def test_delete_with_running_jobs_cancels_them_and_the_run_disappears(h, ns, s3_prefix):
    run = "deleted"
    h.create_run(ns, run, spec(s3_prefix, students=1))
    job = h.next_job(ns, run, set(), STEP)
    name = job["metadata"]["name"]
    h.set_phase(ns, name, "Running")
    h.wait_run(ns, run, lambda s: any(j["state"] == "Running" for j in s.get("jobs", [])), STEP, "a running job")
    body = h.get_run(ns, run)
    assert "noisystudent.dev/finalizer" in body["metadata"]["finalizers"]

    from kubernetes import watch
    from operator_harness import VOLCANO_JOBS

    since = h.custom.list_namespaced_custom_object(**VOLCANO_JOBS, namespace=ns)["metadata"]["resourceVersion"]
    h.delete_run(ns, run)
    # Every change of the job from now on, in order, until the garbage collector deletes it (its owner is gone).
    phases = []
    for event in watch.Watch().stream(h.custom.list_namespaced_custom_object, **VOLCANO_JOBS, namespace=ns,
                                      resource_version=since, timeout_seconds=int(STEP)):
        if event["object"]["metadata"]["name"] == name:
            phases.append("deleted" if event["type"] == "DELETED" else job_phase(event["object"]))
            if event["type"] == "DELETED":
                break
    assert phases[-1:] == ["deleted"], phases  # cancelled (deleted with its pods) or garbage-collected
    wait_for(lambda: h.get_run(ns, run) is None, STEP, f"run {run} to disappear")
    wait_for(lambda: not h.pods(ns, name), STEP, f"the pods of {name} to go")
    assert h.jobs(ns, run) == []


# ----------------------------------------------------------------------------- (c2) finished jobs


def test_finished_jobs_are_deleted_with_their_pods_after_their_end_is_recorded(h, ns, s3_prefix):
    """spec.scheduler.ttlSecondsAfterFinished: 0 — each finished Volcano Job (a failed attempt too)
    goes with its pods once status records its end; none is submitted again because it is gone."""
    run = "ttl"
    h.create_run(ns, run, spec(s3_prefix, students=1, scheduler={"ttlSecondsAfterFinished": 0}))
    names = h.job_names(ns, run)
    first = h.next_job(ns, run, set(), STEP)["metadata"]["name"]
    h.set_phase(ns, first, "Running")
    h.set_phase(ns, first, "Failed")
    h.wait_run(ns, run, lambda s: any(j["name"] == first and j["state"] == "Failed" for j in s["jobs"]),
               STEP, f"{first} recorded Failed")
    wait_for(lambda: h.job(ns, first) is None, STEP, f"the failed job {first} to be deleted")
    retry = h.job_name(ns, run, Stage(0, TEACHER), 1)
    drive_to_end(h, ns, run, len(names))  # the retry, then every later stage
    status = h.wait_run(ns, run, lambda s: s.get("stage") == "Succeeded", STEP, "Succeeded")
    wait_for(lambda: h.jobs(ns, run) == [], STEP, "every finished Volcano Job of the run to be deleted",
             detail=lambda: json.dumps([j["metadata"]["name"] for j in h.jobs(ns, run)]))
    assert all(not h.pods(ns, job) for job in [first, *names[1:], retry])
    status = h.wait_run(ns, run, lambda s: all(j.get("removedAt") for j in s["jobs"]), STEP, "removals recorded")
    assert [(j["name"], j["state"]) for j in status["jobs"]] == (
        [(first, "Failed"), (retry, "Succeeded")] + [(n, "Succeeded") for n in names[1:]])
    assert is_true(status, "Succeeded") and is_true(status, "Ready")
    time.sleep(3)  # a few passes later: nothing came back
    assert h.jobs(ns, run) == []
    reasons = Counter(e.reason for e in h.events(ns, run))
    assert reasons["JobSubmitted"] == len(names) + 1 and reasons["JobResubmitted"] == 0


# ----------------------------------------------------------------------------- (c3) jobs that never start


def test_a_job_no_node_can_hold_says_what_volcano_says_then_hits_the_pending_timeout(h, ns, s3_prefix):
    """More nvidia.com/gpu than any node has: Volcano never creates the pods; the run's JobPending
    message quotes the PodGroup's Unschedulable condition, and pendingTimeoutSeconds fails the run."""
    run = "no-gpu"
    h.create_run(ns, run, spec(s3_prefix, students=1, resources={"labelShards": 2, "gpu": 64},
                               pendingTimeoutSeconds=25))
    job = h.next_job(ns, run, set(), STEP)["metadata"]["name"]
    status = h.wait_run(ns, run, lambda s: "Volcano cannot schedule" in (condition(s, "Ready").get("message") or ""),
                        STEP, "the JobPending message quoting Volcano")
    assert condition(status, "Ready")["reason"] == "JobPending"
    waiting = condition(status, "Ready")["message"]
    assert "nvidia.com/gpu" in waiting or "Unschedulable" in waiting, waiting
    assert h.pods(ns, job) == []
    status = h.wait_run(ns, run, lambda s: is_true(s, "Failed"), STEP, "PendingTimeout")
    failed = condition(status, "Failed")
    assert failed["reason"] == "PendingTimeout" and "Volcano cannot schedule" in failed["message"], failed
    wait_for(lambda: h.job(ns, job) is None, STEP, f"the timed-out job {job} to be cancelled")


# ----------------------------------------------------------------------------- (d) suspend


def test_suspend_cancels_the_running_job_and_resume_continues_where_it_stopped(h, ns, s3_prefix):
    run = "suspended"
    h.create_run(ns, run, spec(s3_prefix, students=1))
    seen: set[str] = set()
    teacher = h.next_job(ns, run, seen, STEP)
    h.set_phase(ns, teacher["metadata"]["name"], "Running")
    h.complete(ns, teacher)
    label = h.next_job(ns, run, seen, STEP)
    assert label["metadata"]["name"] == h.job_name(ns, run, Stage(1, LABEL))
    h.set_phase(ns, label["metadata"]["name"], "Running")
    h.wait_run(ns, run, lambda s: s.get("stage") == "Labeling", STEP, "Labeling")

    h.patch_spec(ns, run, {"suspend": True})
    wait_for(lambda: h.job(ns, h.job_name(ns, run, Stage(1, LABEL))) is None, STEP, "the label job to be gone")
    status = h.wait_run(ns, run, lambda s: s.get("stage") == "Suspended" and is_true(s, "Suspended"), STEP,
                        "Suspended")
    assert not is_true(status, "Progressing")
    time.sleep(3)  # three operator intervals: nothing new may be launched while suspended
    assert {j["metadata"]["name"] for j in h.jobs(ns, run)} == seen - {label["metadata"]["name"]}
    h.wait_run(ns, run, lambda s: [j["state"] for j in s["jobs"] if j["name"] == label["metadata"]["name"]]
               == ["Cancelled"], STEP, "the label job confirmed Cancelled")

    h.patch_spec(ns, run, {"suspend": False})
    resumed = h.next_job(ns, run, seen, STEP)
    assert resumed["metadata"]["name"] == h.job_name(ns, run, Stage(1, LABEL), 1)  # the interrupted stage, as a new attempt
    status = h.wait_run(ns, run, lambda s: s.get("stage") == "Labeling" and not is_true(s, "Suspended"), STEP,
                        "Labeling again")
    assert [g["generation"] for g in status["generations"]] == [0]  # the teacher was not redone
    h.set_phase(ns, resumed["metadata"]["name"], "Running")
    h.complete(ns, resumed)
    for _ in range(3):  # balance, student, export
        job = h.next_job(ns, run, seen, STEP)
        h.complete(ns, job)
    status = h.wait_run(ns, run, lambda s: s.get("stage") == "Succeeded", STEP, "Succeeded")
    assert sum(1 for j in h.jobs(ns, run) if job_stage(j).kind == "teacher") == 1
    assert status["observedGeneration"] == h.get_run(ns, run)["metadata"]["generation"] == 3


def test_quick_suspend_resume_waits_until_the_cancelled_job_is_gone(h, ns, s3_prefix):
    """A GitOps toggle: suspended and resumed while the cancelled job's pods still stop."""
    run = "toggled"
    h.create_run(ns, run, spec(s3_prefix, students=1))
    first = h.next_job(ns, run, set(), STEP)["metadata"]["name"]
    h.set_phase(ns, first, "Running")
    h.wait_run(ns, run, lambda s: any(j["state"] == "Running" for j in s.get("jobs", [])), STEP, "Running")
    h.hold_pods(ns, first)  # its pods stay Terminating once deleted
    h.patch_spec(ns, run, {"suspend": True})
    wait_for(lambda: (h.job(ns, first) or {}).get("metadata", {}).get("deletionTimestamp"), STEP,
             f"{first} being deleted")
    h.patch_spec(ns, run, {"suspend": False})
    time.sleep(4)  # four operator intervals
    status = h.status(ns, run)
    assert [j["state"] for j in status["jobs"]] == ["Cancelling"], status["jobs"]
    assert [j["metadata"]["name"] for j in h.jobs(ns, run)] == [first]  # no second attempt while it stops
    h.hold_pods(ns, first, hold=False)
    wait_for(lambda: h.job(ns, first) is None, STEP, f"{first} gone once its pods are",
             detail=lambda: json.dumps({"job": (h.job(ns, first) or {}).get("metadata"),
                                        "pods": [p["metadata"] for p in h.pods(ns, first)]}, indent=1))
    second = h.next_job(ns, run, {first}, STEP)["metadata"]["name"]
    assert second == h.job_name(ns, run, Stage(0, TEACHER), 1)
    status = h.wait_run(ns, run, lambda s: [j["state"] for j in s["jobs"]][:1] == ["Cancelled"], STEP, "Cancelled")
    assert h.job(ns, first) is None and not h.pods(ns, first)


# ----------------------------------------------------------------------------- (e) failure


def test_failed_stage_is_retried_with_backoff_then_the_run_fails(h, ns, s3_prefix):
    run = "failing"
    h.create_run(ns, run, spec(s3_prefix, students=1, retry={"limit": 2, "backoffSeconds": 2, "maxBackoffSeconds": 3}))
    seen: set[str] = set()
    teacher = h.next_job(ns, run, seen, STEP)
    h.complete(ns, teacher)
    delays = []
    for attempt in range(3):
        job = h.next_job(ns, run, seen, STEP)
        if attempt:
            delays.append(time.monotonic() - failed_at)
        assert job["metadata"]["name"] == h.job_name(ns, run, Stage(1, LABEL), attempt)
        assert job_attempt(job) == attempt
        h.set_phase(ns, job["metadata"]["name"], "Running")
        h.set_phase(ns, job["metadata"]["name"], "Failed")
        failed_at = time.monotonic()
        if attempt < 2:
            h.wait_run(ns, run, lambda s: s.get("nextRetryAt") is not None, STEP, "a scheduled retry")
    # backoff 2 s, then 4 s capped at 3 s (the operator observes within its 1 s interval)
    assert delays[0] >= 1.5 and delays[1] >= 2.5, delays

    status = h.wait_run(ns, run, lambda s: is_true(s, "Failed"), STEP, "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "StageFailed"
    assert "Stage label of generation 1" in failed["message"] and h.job_name(ns, run, Stage(1, LABEL), 2) in failed["message"]
    # The message says what the cluster knows: the pod, its exit code and termination message, a logs hint.
    last = h.job_name(ns, run, Stage(1, LABEL), 2)
    assert f"pod {last}-" in failed["message"] and "exited with code 1 (Error): harness: the workload failed" in failed["message"]
    assert f"kubectl logs -n {ns} {last}-" in failed["message"] and "<NONE>" not in json.dumps(status)
    # One JobFailed Event per failed attempt, not one per pass while the retry waits.
    events = [(e.reason, e.message) for e in h.events(ns, run)]
    assert Counter(r for r, _ in events)["JobFailed"] == 2, events
    assert status["stage"] == "Failed" and not is_true(status, "Progressing")
    time.sleep(2)
    assert len(h.jobs(ns, run)) == 4  # teacher + three label attempts, no fourth


def test_job_refused_by_volcano_fails_the_run_with_the_webhooks_message(h, ns, s3_prefix):
    run = "no-queue"
    h.create_run(ns, run, spec(s3_prefix, students=1, scheduler={"name": "kubernetes", "queue": "no-such-queue"}))
    status = h.wait_run(ns, run, lambda s: is_true(s, "Failed"), STEP, "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "SubmitRejected"
    assert "denied the request" in failed["message"] and "no-such-queue" in failed["message"], failed["message"]
    assert status["jobs"][0]["state"] == "Failed" and status["jobs"][0]["reason"] == "SubmitRejected"
    time.sleep(3)  # three operator intervals: never retried, one Event each, no kopf error Events
    assert h.jobs(ns, run) == []
    reasons = Counter(e.reason for e in h.events(ns, run))
    assert reasons["SubmitError"] == 1 and reasons["RunFailed"] == 1, reasons
    assert set(reasons) == {"SubmitError", "RunFailed"}, reasons  # no kopf error Events


def test_a_label_job_of_the_most_shards_the_crd_admits_is_stored_as_one_task(h, ns, s3_prefix):
    """1,024 label shards (the most the CRD admits). TorchX renders a task per replica: 1,024 tasks,
    2.15 MB, which the API server could not store (500: `trying to send message larger than max`;
    from 1.5 MiB, etcd's `request is too large`), so the run failed. The operator makes them one
    task of 1,024 replicas (each pod's index from Volcano's env plugin): the Job is stored, and
    Volcano's admission webhook, which names pods `<job>-<task>-<index>`, admits it."""
    run = "many-shards"
    h.create_run(ns, run, spec(s3_prefix, students=1, resources={"labelShards": 1024}))
    seen: set[str] = set()
    h.complete(ns, h.next_job(ns, run, seen, STEP))
    label = h.next_job(ns, run, seen, STEP)
    [task] = label["spec"]["tasks"]
    assert (task["name"], task["replicas"]) == ("label", 1024)
    assert len(json.dumps(label)) < 20_000
    status = h.status(ns, run)
    assert not is_true(status, "Failed"), status


def test_an_artifact_store_that_refuses_reads_is_a_condition_quoting_the_store(h, cluster, ns, s3_prefix, s3_server,
                                                                              tmp_path):
    """The operator's S3 key may write but not read (SeaweedFS's `Write` action only): every HEAD of a
    marker is answered 403. The run says so (Ready: ArtifactStoreError, quoting S3 and the run's
    prefix), one Warning Event, nothing submitted. (A key that may Read but not List gets 404 for a
    missing key from SeaweedFS, unlike AWS's 403: that is the only 403 SeaweedFS gives a marker read.)"""
    from s3_server import WRITE_ONLY

    run = "no-reads"
    h.operator.stop()
    kubeconfig = operator_kubeconfig(cluster.server.kubeconfig, cluster.server.run_dir / "pki", tmp_path)
    write_only = OperatorProcess(kubeconfig, tmp_path / "operator.log", env=s3_server.env(WRITE_ONLY))
    try:
        write_only.start()
        h.create_run(ns, run, spec(s3_prefix, students=1))
        status = h.wait_run(ns, run, lambda s: condition(s, "Ready").get("reason") == "ArtifactStoreError", STEP,
                            "Ready: ArtifactStoreError")
        message = condition(status, "Ready")["message"]
        assert f"reading completion markers under {s3_prefix}" in message and "403" in message, message
        time.sleep(3)  # three operator intervals: the same error, no new Event, nothing submitted
        assert h.jobs(ns, run) == [] and not h.status(ns, run).get("jobs")
        reasons = Counter(e.reason for e in h.events(ns, run))
        assert reasons == {"ArtifactStoreError": 1}, reasons  # no kopf error Events either
    finally:
        write_only.stop()
        h.operator.start()
    teacher = h.next_job(ns, run, set(), STEP)  # once the operator may read
    assert teacher["metadata"]["name"] == h.job_names(ns, run)[0]


# ----------------------------------------------------------------------------- (e2) tenancy


def test_local_cwd_run_is_refused_by_an_operator_in_the_cluster(h, ns, s3_prefix):
    """The operator runs as in a cluster (no --scheduler): a run cannot make it fork its stages."""
    run = "local"
    h.create_run(ns, run, spec(s3_prefix, students=1, scheduler={"name": "local_cwd"}))
    status = h.wait_run(ns, run, lambda s: is_true(s, "Failed"), STEP, "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "SchedulerNotServed"
    assert "spec.scheduler.name: local_cwd is not served" in failed["message"]
    assert not status.get("jobs") and h.jobs(ns, run) == []


def test_the_volcano_job_watch_is_filtered_on_the_server(h, cluster):
    """kopf's handler `labels=` filters after the fact: every team's Jobs would stream in."""
    from urllib.parse import parse_qs, urlsplit

    def job_reads() -> list[str]:
        return [e["requestURI"] for e in read_audit(cluster.audit_log)
                if is_operator_request(e) and e["verb"] in ("list", "watch")
                and (e.get("objectRef") or {}).get("resource") == "jobs"]

    uris = wait_for(job_reads, STEP, "the operator's list or watch of Volcano Jobs")
    for uri in uris:
        selector = parse_qs(urlsplit(uri).query).get("labelSelector")
        assert selector == ["app.kubernetes.io/managed-by=noisy-student-operator"], uri


def test_job_pods_are_admitted_in_a_namespace_enforcing_pod_security_restricted(h, cluster, s3_prefix):
    """Without a securityContext Volcano's pod creates were Forbidden there: a job that never starts."""
    from kubernetes import client as k8s
    from kubernetes.utils import parse_quantity

    ns = f"t-{uuid.uuid4().hex[:8]}"
    ensure_namespace(cluster.client, ns, {"pod-security.kubernetes.io/enforce": "restricted",
                                          "pod-security.kubernetes.io/enforce-version": "latest"})
    try:
        run = "restricted"
        h.create_run(ns, run, spec(s3_prefix, students=1, resources={"labelShards": 2, "memoryMiB": 1024}))
        name = h.next_job(ns, run, set(), STEP)["metadata"]["name"]

        def failed_creates() -> list[str]:
            return [f"{e.reason}: {e.message}" for e in h.core.list_namespaced_event(ns).items
                    if e.reason == "FailedCreate" or "forbidden" in (e.message or "").lower()]

        pods = wait_for(lambda: h.pods(ns, name), STEP, f"the pods of {name}", detail=lambda: str(failed_creates()))
        assert failed_creates() == []
        for pod in pods:
            assert pod["spec"]["automountServiceAccountToken"] is False
            for container in pod["spec"]["containers"]:
                assert container["resources"]["requests"] == container["resources"]["limits"]
                assert parse_quantity(container["resources"]["requests"]["memory"]) == 1024 * 2**20  # MiB, not MB
            assert pod["status"]["qosClass"] == "Guaranteed"
    finally:
        k8s.CoreV1Api(cluster.client).delete_namespace(ns)


# ----------------------------------------------------------------------------- (f) server-side validation


INVALID: list[tuple[str, Any, str]] = [
    # (dotted path below spec to set, value (None removes it), text the server's message must contain)
    ("students", [], "spec.students"),
    ("students", [{"model": "resnet18"}] * 33, "spec.students"),
    ("teacher", None, "spec.teacher"),
    ("teacher.model", "ResNet-18", "spec.teacher.model"),
    ("teacher.epochs", 0, "spec.teacher.epochs"),
    ("data.numClasses", 1, "spec.data.numClasses"),
    ("data.imageSize", 4, "spec.data.imageSize"),
    ("data.labeled", None, "labeled, unlabeled and validation are required unless prepare is set"),
    ("data.prepare", {"source": "folder", "labelsPerClass": 10}, "spec.data.prepare.path"),
    ("data.prepare", {"source": "cifar", "labelsPerClass": 10}, "spec.data.prepare.source"),
    ("artifacts.uri", "http://example.com/runs", "spec.artifacts.uri"),
    ("artifacts.secretRef.name", "Bad_Name", "spec.artifacts.secretRef.name"),
    ("noise.dropout", 1.0, "spec.noise.dropout"),
    ("noise.stochasticDepth", -0.1, "spec.noise.stochasticDepth"),
    ("noise.randAugment.magnitude", 31, "spec.noise.randAugment.magnitude"),
    ("pseudoLabels.type", "medium", "spec.pseudoLabels.type"),
    ("pseudoLabels.confidenceThreshold", 1.5, "spec.pseudoLabels.confidenceThreshold"),
    ("pseudoLabels.imagesPerClass", 0, "spec.pseudoLabels.imagesPerClass"),
    ("pseudoLabels.imagesPerClass", "many", "spec.pseudoLabels.imagesPerClass"),
    ("training.batchSize", 0, "spec.training.batchSize"),
    ("training.optimizer", "adam", "spec.training.optimizer"),
    ("training.learningRate", 0, "spec.training.learningRate"),
    ("resources.nodes", {"min": 4, "max": 2}, "min must not exceed max"),
    ("resources.procsPerNode", 0, "spec.resources.procsPerNode"),
    ("resources.memoryMiB", 100, "spec.resources.memoryMiB"),
    ("scheduler.name", "slurm", "spec.scheduler.name"),
    # lengths and maxima of everything a user sets (issue 13)
    ("resources.image", "registry.example.com/" + "x" * 500, "spec.resources.image"),
    ("scheduler.queue", "q" * 254, "spec.scheduler.queue"),
    ("scheduler.queue", "Team A", "spec.scheduler.queue"),
    ("data.labeled", "s3://datasets/" + "x" * 1024, "spec.data.labeled"),
    ("data.unlabeled", "s3://datasets/" + "x" * 1024, "spec.data.unlabeled"),
    ("data.validation", "s3://datasets/" + "x" * 1024, "spec.data.validation"),
    ("data.prepare", {"source": "folder", "labelsPerClass": 10, "path": "/" + "x" * 1024}, "spec.data.prepare.path"),
    ("data.prepare", {"source": "mnist", "labelsPerClass": 10, "seed": 2**32}, "spec.data.prepare.seed"),
    ("artifacts.uri", "s3://runs/" + "x" * 1024, "spec.artifacts.uri"),
    ("artifacts.uri", "file:///var/runs/", "spec.artifacts.uri: Invalid value"),  # kubernetes + file://
    ("resources.memoryMiB", 4 * 1024 * 1024 + 1, "spec.resources.memoryMiB"),
    ("resources.train", {"memoryMiB": 4 * 1024 * 1024 + 1}, "spec.resources.train.memoryMiB"),
    ("resources.label", {"gpu": 65}, "spec.resources.label.gpu"),
    ("resources.balance", {"cpu": 0}, "spec.resources.balance.cpu"),
    ("training.seed", 2**32, "spec.training.seed"),
    ("placement.labels", {"bad key": "x"}, "spec.placement.labels"),
    ("placement.labels", {"team": "x" * 64}, "spec.placement.labels.team"),
    ("placement.train", {"labels": {"kueue.x-k8s.io/queue-name": "not valid!"}}, "spec.placement.train.labels"),
    ("placement.label", {"nodeSelector": {"pool": "not valid!"}}, "spec.placement.label.nodeSelector"),
    ("placement.priorityClassName", "Batch_Low", "spec.placement.priorityClassName"),
    ("placement.serviceAccountName", "s" * 254, "spec.placement.serviceAccountName"),
    ("placement.tolerations", [{"key": "k", "effect": "Sometimes"}], "spec.placement.tolerations[0].effect"),
    ("placement.imagePullSecrets", [{"name": ""}], "spec.placement.imagePullSecrets[0].name"),
    ("retry.limit", 21, "spec.retry.limit"),
    ("suspend", "yes", "spec.suspend"),
    # the official recipe's fields and RandAugment values the workloads cannot honour (issue 15)
    ("noise.randAugment.ops", 0, "spec.noise.randAugment.ops"),
    ("noise.randAugment", {"magnitude": 15, "magnitudeMax": 10}, "magnitude must not exceed magnitudeMax"),
    ("noise.randAugment.fill", "purple", "spec.noise.randAugment.fill"),
    ("training.emaDecay", 1.0, "spec.training.emaDecay"),
    ("training.labelSmoothing", -0.1, "spec.training.labelSmoothing"),
]


def with_value(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    document = json.loads(json.dumps(document))
    *parents, leaf = path.split(".")
    node = document
    for key in parents:
        node = node.setdefault(key, {})
    if value is None:
        node.pop(leaf, None)
    else:
        node[leaf] = value
    return document


@pytest.mark.parametrize("path,value,message", INVALID, ids=[f"{p}={v!r}"[:40] for p, v, _ in INVALID])
def test_invalid_spec_is_rejected_by_the_server_naming_the_field(cluster, ns, path, value, message):
    from kubernetes.client.rest import ApiException

    h = Harness(cluster.client)
    document = with_value(spec("s3://bucket/runs/"), path, value)
    with pytest.raises(ApiException) as error:
        h.create_run(ns, "invalid", document)
    assert error.value.status == 422, error.value.body
    assert message in json.loads(error.value.body)["message"], error.value.body


def test_model_args_are_kept_by_the_server(cluster, ns):
    h = Harness(cluster.client)
    args = {"output_stride": 8, "channels": [32, 48, 48, 96], "stem_type": "deep", "zero_init_last": False}
    document = with_value(spec("s3://bucket/runs/", suspend=True), "teacher.modelArgs", args)
    h.create_run(ns, "model-args", document)
    assert h.get_run(ns, "model-args")["spec"]["teacher"]["modelArgs"] == args  # not pruned


def test_run_name_longer_than_40_is_rejected_by_the_server(cluster, ns):
    from kubernetes.client.rest import ApiException

    with pytest.raises(ApiException) as error:
        Harness(cluster.client).create_run(ns, "n" * 41, spec("s3://bucket/runs/"))
    assert error.value.status == 422 and "metadata.name must be at most 40" in error.value.body


def test_run_name_that_is_not_a_dns_1035_label_is_rejected_by_the_server(cluster, ns):
    from kubernetes.client.rest import ApiException

    with pytest.raises(ApiException) as error:
        Harness(cluster.client).create_run(ns, "2024-exp", spec("s3://bucket/runs/"))
    assert error.value.status == 422 and "metadata.name must be a DNS-1035 label" in error.value.body


def test_unknown_field_is_rejected_under_strict_field_validation(cluster, ns):
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException
    from operator_harness import RUNS, run_document

    document = run_document("unknown", {**spec("s3://bucket/runs/"), "teacherr": {"model": "x"}})
    with pytest.raises(ApiException) as error:
        k8s.CustomObjectsApi(cluster.client).create_namespaced_custom_object(
            **RUNS, namespace=ns, body=document, field_validation="Strict")
    assert 'unknown field "spec.teacherr"' in json.loads(error.value.body)["message"]


# ----------------------------------------------------------------------------- (g) the Volcano Jobs


def test_volcano_jobs_pass_the_server_schema_and_reference_the_secret(h, ns, s3_prefix, s3_server):
    run = "jobs"
    created = h.create_run(ns, run, spec(s3_prefix, students=1))
    job = h.next_job(ns, run, set(), STEP)  # created against Volcano's CRD
    metadata = job["metadata"]
    assert metadata["name"] == h.job_name(ns, run, Stage(0, TEACHER))
    assert metadata["labels"] == {
        "app.kubernetes.io/managed-by": "noisy-student-operator",
        "noisystudent.dev/run": run, "noisystudent.dev/stage": "teacher",
        "noisystudent.dev/generation": "0", "noisystudent.dev/attempt": "0",
        "noisystudent.dev/stage-key": h.layout(ns, run).key(Stage(0, TEACHER)),
    }
    assert metadata["ownerReferences"] == [{
        "apiVersion": "noisystudent.dev/v1alpha1", "kind": "NoisyStudentRun", "name": run,
        "uid": created["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True,
    }]
    tasks = job["spec"]["tasks"]
    assert tasks and job["spec"]["queue"] == "default" and job["spec"]["schedulerName"] == "volcano"
    for task in tasks:
        assert task["template"]["metadata"]["labels"]["noisystudent.dev/run"] == run
        for container in task["template"]["spec"]["containers"]:
            assert {"secretRef": {"name": SECRET_NAME}} in container["envFrom"]
    status = h.wait_run(ns, run, lambda s: bool(s.get("jobs")), STEP, "a job in status")
    everything = json.dumps(job) + json.dumps(status) + json.dumps(h.get_run(ns, run))
    for secret in (s3_server.secret_key, s3_server.access_key):
        where = everything.find(secret)
        assert where < 0, f"{secret!r} found: ...{everything[max(0, where - 300):where + 100]}"


def test_volcanos_webhook_admits_every_name_the_operator_derives_and_refuses_what_check_names_refuses(h, ns):
    """Dry-run creates (Volcano's admission webhooks judge; nothing is stored): the operator's own
    rendering, for a 40-character run name, of a 1,024-shard label job and a 16-node student at
    attempt 9,999,999 is admitted (a 1,024-node student is over the API server's 3 MiB: a 413); the student
    renamed to the shortest name `check_names` refuses is refused by the webhook too, and one character
    shorter admitted. The label job is one task of 1,024 replicas, whose pods the webhook judges by the
    task's position (`<job>-label-0`): `check_names` refuses the name whose last pod,
    `<job>-label-1023`, would be over 63 characters, which the webhook would admit."""
    from kubernetes.client import ApiClient
    from kubernetes.client.rest import ApiException
    from operator_harness import VOLCANO_JOBS

    from noisy_student_operator.api import RunSpec
    from noisy_student_operator.backend import JobContext, TorchXJobBackend, make_runner
    from noisy_student_operator.core.layout import STUDENT
    from noisy_student_operator.core.planner import JobSubmitError
    from noisy_student_operator.core.render import render_job, run_layout
    from noisy_student_operator.volcano import check_names

    submitted: list[dict[str, Any]] = []

    class DryRunRunner:
        """TorchX's runner, whose `schedule` creates the Volcano Job with dryRun=All."""

        runner = make_runner()

        def dryrun(self, *args: Any, **kwargs: Any) -> Any:
            return self.runner.dryrun(*args, **kwargs)

        def schedule(self, dryrun: Any) -> None:
            submitted.append(ApiClient().sanitize_for_serialization(dryrun.request.resource))
            create(submitted[-1])

    def create(job: dict[str, Any]) -> None:
        h.custom.create_namespaced_custom_object(**VOLCANO_JOBS, namespace=ns, body=job, dry_run="All")

    run = "r" * 40
    run_spec = RunSpec.model_validate(spec("s3://bucket/runs/", students=1, resources={
        "labelShards": 1024, "train": {"nodes": {"min": 16, "max": 16}}}))
    layout = run_layout(run_spec, ns, run, "image:test")
    backend = TorchXJobBackend("kubernetes", runner=DryRunRunner())
    for stage in (Stage(1, LABEL), Stage(1, STUDENT)):
        backend.submit(render_job(run_spec, layout, stage, 9_999_999, 1000), JobContext(run, ns, "uid", SECRET_NAME))
    label, student = submitted
    assert [(t["name"], t["replicas"]) for t in label["spec"]["tasks"]] == [("label", 1024)]
    assert len(student["spec"]["tasks"]) == 16

    def renamed(job: dict[str, Any], length: int) -> dict[str, Any]:
        return {**job, "metadata": {**job["metadata"], "name": "j" * length}}

    longest = 63 - len(f"-{student['spec']['tasks'][-1]['name']}-15")  # the webhook's `<job>-<task>-<position>`
    check_names(renamed(student, longest))
    create(renamed(student, longest))
    with pytest.raises(JobSubmitError):
        check_names(renamed(student, longest + 1))
    with pytest.raises(ApiException) as refused:
        create(renamed(student, longest + 1))
    assert "63" in refused.value.body, refused.value.body
    longest = 63 - len("-label-1023")  # the last pod's name
    check_names(renamed(label, longest))
    create(renamed(label, longest))
    with pytest.raises(JobSubmitError, match="label-1023"):
        check_names(renamed(label, longest + 1))
    create(renamed(label, longest + 1))  # the webhook sees `-label-0`; the pod `-label-1023` would be refused


# ----------------------------------------------------------------------------- (h) kubectl views


def test_table_view_shows_the_printer_columns(h, ns, s3_prefix, cluster):
    run = "table"
    h.create_run(ns, run, spec(s3_prefix, students=1))
    teacher = h.next_job(ns, run, set(), STEP)
    h.complete(ns, teacher)
    h.wait_run(ns, run, lambda s: s.get("teacherTop1") is not None and s.get("stage") == "Labeling", STEP,
               "Labeling with a teacher top-1")
    response = cluster.client.call_api(
        f"/apis/noisystudent.dev/v1alpha1/namespaces/{ns}/noisystudentruns", "GET",
        header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
        auth_settings=["BearerToken"], response_types_map={200: "object"}, _return_http_data_only=True)
    columns = [c["name"] for c in response["columnDefinitions"]]
    assert columns[:1] == ["Name"] and {"Generation", "Stage", "Teacher-Top1", "Ready", "Reason", "Age"} <= set(columns)
    row = dict(zip(columns, response["rows"][0]["cells"]))
    assert row["Name"] == run and row["Generation"] == 1 and row["Stage"] == "Labeling"
    assert row["Teacher-Top1"] == pytest.approx(0.7)
    # The label job may not have started yet: a run in progress is Ready=False for either reason.
    assert row["Ready"] == "False" and row["Reason"] in {"StageRunning", "JobPending"}


def test_field_descriptions_are_published(cluster):
    """`kubectl explain` when kubectl is at hand, else the OpenAPI v2 document it reads."""
    kubectl = find_kubectl()

    def explain() -> str | None:
        if kubectl:
            result = subprocess.run([kubectl, "explain", "noisystudentrun.spec"], capture_output=True, text=True,
                                    env={**os.environ, "KUBECONFIG": str(cluster.server.kubeconfig)}, timeout=60)
            return result.stdout if result.returncode == 0 else None
        document = cluster.client.call_api("/openapi/v2", "GET", auth_settings=["BearerToken"],
                                           response_types_map={200: "object"}, _return_http_data_only=True)
        definition = document["definitions"].get("dev.noisystudent.v1alpha1.NoisyStudentRun")
        return json.dumps(definition["properties"]["spec"]) if definition else None

    # The server publishes a new CRD's schema a moment after it is Established.
    text = wait_for(explain, STEP, "the NoisyStudentRun schema in the published OpenAPI", interval=1.0)
    assert "One entry per student generation" in text
    assert "Stop launching stages and cancel running jobs" in text


# ----------------------------------------------------------------------------- RBAC coverage


def test_audit_log_sees_the_operator(h, cluster):
    events = list(read_audit(cluster.audit_log))
    assert any(is_operator_request(e) for e in events), "no request of the operator in the audit log"
    permissions = operator_permissions(events)
    assert ("noisystudent.dev", "noisystudentruns", "watch") in permissions
    assert ("batch.volcano.sh", "jobs", "create") in permissions
    assert not any(resource.startswith("secrets") for _, resource, _ in permissions)


# ----------------------------------------------------------------------------- (f) disruptions and chaos


FINISHED_PHASES = ("Completed", "Failed", "Aborted", "Terminated")


def test_evicted_job_is_retried_without_using_the_retry_limit(h, ns, s3_prefix):
    run = "evicted"
    h.create_run(ns, run, spec(s3_prefix, students=1, retry={"limit": 0, "backoffSeconds": 1}))
    seen: set[str] = set()
    first = h.next_job(ns, run, seen, STEP)["metadata"]["name"]
    h.running_pods(ns, first)
    h.evict_pods(ns, first)
    second = h.next_job(ns, run, seen, STEP)
    assert second["metadata"]["name"] == h.job_name(ns, run, Stage(0, TEACHER), 1)
    status = h.wait_run(ns, run, lambda s: any(j["name"] == first and j["state"] == "Failed" for j in s["jobs"]),
                        STEP, f"{first} recorded")
    evicted = next(j for j in status["jobs"] if j["name"] == first)
    assert evicted["state"] == "Failed" and evicted["reason"] == "Disrupted", evicted
    assert "was disrupted (TerminationByKubelet: The node was low on resource: memory.)" in evicted["message"]
    assert not is_true(status, "Failed")
    h.complete(ns, second)
    for _ in range(len(h.job_names(ns, run)) - 1):  # the stages after the teacher
        h.complete(ns, h.next_job(ns, run, seen, STEP))
    h.wait_run(ns, run, lambda s: s.get("stage") == "Succeeded", STEP, "Succeeded")
    assert Counter(e.reason for e in h.events(ns, run))["JobDisrupted"] == 1


def test_a_job_aborted_outside_the_operator_is_waited_for_through_aborting_then_retried(h, ns, s3_prefix):
    """`vcctl job suspend` (a Volcano Command AbortJob): Volcano's controller deletes the pods and keeps
    the Job `Aborting` while they stop; the operator waits (no second attempt beside it), and once the
    Job is `Aborted` retries the stage as a disruption, not a failure (retry.limit 0)."""
    run = "aborted"
    h.create_run(ns, run, spec(s3_prefix, students=1, retry={"limit": 0, "backoffSeconds": 1}))
    seen: set[str] = set()
    first = h.next_job(ns, run, seen, STEP)["metadata"]["name"]
    h.set_phase(ns, first, "Running")
    h.wait_run(ns, run, lambda s: any(j["state"] == "Running" for j in s.get("jobs", [])), STEP, "Running")
    h.hold_pods(ns, first)  # its pods stay Terminating once deleted: Volcano keeps the Job Aborting
    h.abort_job(ns, first)
    wait_for(lambda: job_phase(h.job(ns, first) or {}) == "Aborting", STEP, f"{first} Aborting",
             detail=lambda: json.dumps((h.job(ns, first) or {}).get("status"), indent=1))
    time.sleep(3)  # three operator intervals
    assert job_phase(h.job(ns, first)) == "Aborting"
    assert [j["state"] for j in h.status(ns, run)["jobs"]] == ["Running"]
    assert [j["metadata"]["name"] for j in h.jobs(ns, run)] == [first]  # no second attempt while it stops
    h.hold_pods(ns, first, hold=False)
    second = h.next_job(ns, run, seen, STEP)["metadata"]["name"]
    assert second == h.job_name(ns, run, Stage(0, TEACHER), 1)
    assert job_phase(h.job(ns, first)) == "Aborted" and not h.pods(ns, first)
    status = h.wait_run(ns, run, lambda s: any(j["name"] == first and j["state"] == "Failed" for j in s["jobs"]),
                        STEP, f"{first} recorded")
    aborted = next(j for j in status["jobs"] if j["name"] == first)
    assert aborted["reason"] == "Disrupted" and not is_true(status, "Failed"), status


def test_chaos_operator_killed_20_times_with_failures_and_evictions(h, ns, s3_prefix):
    """Several runs, the operator SIGKILLed at random moments, injected failures and evictions:
    every run Succeeds, no stage ever has two live jobs, attempts = injected failures + evictions + 1."""
    import random
    import threading

    rng = random.Random(11)
    runs = [f"chaos-{i}" for i in range(3)]
    for i, run in enumerate(runs):
        h.create_run(ns, run, spec(s3_prefix, students=1, training={"seed": i},
                                   retry={"limit": 3, "backoffSeconds": 1, "maxBackoffSeconds": 1}))
    expected_jobs = {run: h.job_names(ns, run) for run in runs}
    all_names = [name for names in expected_jobs.values() for name in names]
    assert len(set(all_names)) == len(all_names)  # no stage shared between the runs

    kills = 0
    stop = threading.Event()

    def chaos() -> None:
        nonlocal kills
        while not stop.is_set():
            time.sleep(rng.uniform(0.3, 2.0))
            h.operator.kill()
            kills += 1
            time.sleep(rng.uniform(0.0, 0.5))
            h.operator.start()

    killer = threading.Thread(target=chaos, daemon=True)
    killer.start()
    injected: Counter[str] = Counter()  # by stage key
    handled: set[str] = set()
    deadline = time.monotonic() + 15 * STEP
    try:
        while True:
            assert time.monotonic() < deadline, f"chaos: runs not done; kills {kills}\n{h.operator.log_tail()}"
            jobs = h.jobs(ns)
            live = Counter(j["metadata"]["labels"]["noisystudent.dev/stage-key"] for j in jobs
                           if job_phase(j) not in FINISHED_PHASES)
            assert max(live.values(), default=0) <= 1, f"a stage has two live jobs: {live}"
            statuses = {run: h.status(ns, run) for run in runs}
            if all(s.get("stage") == "Succeeded" for s in statuses.values()):
                break
            for job in jobs:
                name = job["metadata"]["name"]
                if name in handled or job_phase(job) != "Running":
                    continue
                key = job["metadata"]["labels"]["noisystudent.dev/stage-key"]
                handled.add(name)
                # The first two jobs fail and are evicted for sure; then at random.
                roll = {1: 0.0, 2: 0.3}.get(len(handled), rng.random())
                if injected[key] < 2 and roll < 0.2:
                    injected[key] += 1
                    h.exit_pods(ns, name, 1, "chaos: injected failure")
                elif injected[key] < 2 and roll < 0.35:
                    injected[key] += 1
                    h.evict_pods(ns, name)
                else:
                    while kills < min(20, 2 * len(handled)):  # about two kills per job, 20 at least
                        time.sleep(0.2)
                    h.complete(ns, job)
            time.sleep(0.2)
    finally:
        stop.set()
        killer.join(timeout=STEP)
        if not h.operator.running:
            h.operator.start()
    assert kills >= 20
    assert sum(injected.values()) >= 2
    per_key = Counter(j["metadata"]["labels"]["noisystudent.dev/stage-key"] for j in h.jobs(ns))
    for run in runs:
        for job in expected_jobs[run]:
            key = next(j["metadata"]["labels"]["noisystudent.dev/stage-key"]
                       for j in h.jobs(ns, run) if j["metadata"]["name"].startswith(job))
            assert per_key[key] == injected[key] + 1, (job, per_key[key], injected[key])


# ----------------------------------------------------------------------------- (g) what finished runs cost


def requests_in(audit_log: Path, namespace: str, start: str, end: str | None = None) -> list[str]:
    """The operator's requests about objects of `namespace` received in [start, end), as 'verb URI'."""
    return [f"{e['verb']} {e['requestURI']}" for e in read_audit(audit_log)
            if is_operator_request(e) and (e.get("objectRef") or {}).get("namespace") == namespace
            and start <= e["requestReceivedTimestamp"] and (end is None or e["requestReceivedTimestamp"] < end)]


def audit_now() -> str:
    """Now, as the audit log writes requestReceivedTimestamp (RFC 3339, microseconds, UTC)."""
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_finished_runs_cost_no_requests_while_settled_nor_at_a_restart(h, cluster, ns, s3_prefix, s3_server):
    """Issue 13: a Succeeded, unchanged run gets no pass, no timer and no hint: over a window of many
    operator intervals (--interval 1) and after a restart, the operator asks the API server nothing
    about it and reads none of its markers (S3 requests counted by a proxy, by the runs' prefix)."""
    from s3_server import CountingProxy
    from urllib.parse import urlsplit

    runs = ["settled-a", "settled-b"]
    for seed, run in enumerate(runs):  # distinct seeds: distinct stage keys, no shared jobs
        h.create_run(ns, run, spec(s3_prefix, students=1, training={"seed": seed}))
    for run in runs:
        drive_to_end(h, ns, run, len(h.job_names(ns, run)))
    for run in runs:
        h.wait_run(ns, run, lambda s: s.get("stage") == "Succeeded", STEP, "Succeeded")
    time.sleep(5)  # the last passes' writes (status, RunSucceeded Events) land first
    start = audit_now()
    time.sleep(20)
    settled = requests_in(cluster.audit_log, ns, start, audit_now())
    assert settled == [], f"{len(settled)} requests about {len(runs)} finished runs in 20 s: {Counter(settled)}"

    proxy = CountingProxy(s3_server.endpoint_url)
    h.operator.extra_env["AWS_ENDPOINT_URL"] = proxy.url
    try:
        start = audit_now()
        h.operator.restart()
        time.sleep(20)
        restarted = requests_in(cluster.audit_log, ns, start, audit_now())
        prefix = urlsplit(s3_prefix).path.strip("/")  # path-style requests and list prefixes name it
        markers = [r for r in proxy.requests if prefix in r]
        # The proxy does see this operator's reads: a spec change wakes a run, which reads its markers.
        h.patch_spec(ns, runs[0], {"retry": {"limit": 3}})
        h.wait_run(ns, runs[0], lambda s: s.get("observedGeneration") == h.get_run(ns, runs[0])["metadata"][
            "generation"], STEP, "the changed run's pass")
        woken = [r for r in proxy.requests if prefix in r]
    finally:
        h.operator.extra_env["AWS_ENDPOINT_URL"] = s3_server.endpoint_url
        h.operator.restart()
        proxy.stop()
    assert restarted == [], f"{len(restarted)} requests about {len(runs)} finished runs at a restart: {Counter(restarted)}"
    assert markers == [], f"{len(markers)} S3 requests about {len(runs)} finished runs at a restart: {markers}"
    assert woken, "no S3 request through the proxy after a spec change: the count above saw nothing"


def test_a_running_run_costs_at_most_one_request_a_minute(h, cluster, ns, s3_prefix):
    """Issue 13: job state comes from the watch stream, the run from kopf's: over 20 operator
    intervals (--interval 1) a run whose sharded label job runs costs at most the one GET of its
    job that refreshes what the watch showed (volcano.WATCHED_FOR), no pod listing."""
    run = "running"
    h.create_run(ns, run, spec(s3_prefix, students=1, resources={"labelShards": 4}))
    teacher = h.next_job(ns, run, set(), STEP)
    h.set_phase(ns, teacher["metadata"]["name"], "Running")
    h.complete(ns, teacher)
    label = h.next_job(ns, run, {teacher["metadata"]["name"]}, STEP)
    h.set_phase(ns, label["metadata"]["name"], "Running")  # its 4 pods run
    h.wait_run(ns, run, lambda s: s.get("stage") == "Labeling" and s["jobs"][-1]["state"] == "Running",
               STEP, "the label job Running in status")
    time.sleep(3)
    start = audit_now()
    time.sleep(20)
    running = requests_in(cluster.audit_log, ns, start, audit_now())
    assert len(running) <= 1, f"{len(running)} requests about a running run in 20 s: {Counter(running)}"
