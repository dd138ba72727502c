"""Stage keys against the real API server and the real S3 server: what a spec change reruns.

The operator runs as a process with the chart's permissions; the harness plays
Volcano and the workloads (see `operator_harness`). Each test has its own S3
prefix, so keys never collide between tests.
"""

from __future__ import annotations

import copy
import json
import shlex
import time
from typing import Any

import pytest
from operator_harness import Harness, apply_crds, job_stage, run_crd, stage_metrics, wait_for
from test_operator import STEP, cluster, condition, drive_to_end, h, is_true, ns, operator, recorded_permissions, spec

from noisy_student_operator.api import GROUP, PLURAL, VERSION
from noisy_student_operator.core.layout import EXPORT, LABEL, STUDENT, TEACHER, Stage

pytestmark = pytest.mark.integration

__all__ = ["cluster", "h", "ns", "operator", "recorded_permissions"]  # fixtures shared with test_operator


def job_config(job: dict[str, Any]) -> dict[str, Any]:
    """The workload config that the Volcano Job passes to its container (`--config <json>`)."""
    container = job["spec"]["tasks"][0]["template"]["spec"]["containers"][0]
    # TorchX runs `bash -c '<torchrun ... --config <json>>'`: split the shell words of each argument.
    words = [w for part in [*(container.get("command") or []), *(container.get("args") or [])]
             for w in shlex.split(part)]
    return json.loads(words[words.index("--config") + 1])


def run_to_succeeded(h: Harness, ns: str, run: str) -> dict[str, Any]:
    drive_to_end(h, ns, run, len(h.job_names(ns, run)))
    return h.wait_run(ns, run, lambda s: s.get("stage") == "Succeeded", STEP, "Succeeded")


def new_jobs(h: Harness, ns: str, run: str, seen: set[str]) -> list[str]:
    return sorted(j["metadata"]["name"] for j in h.jobs(ns, run) if j["metadata"]["name"] not in seen)


def test_an_edit_after_succeeded_reruns_exactly_the_changed_stage(h, ns, s3_prefix):
    run = "edited"
    h.create_run(ns, run, spec(s3_prefix, students=2))
    run_to_succeeded(h, ns, run)
    before = {j["metadata"]["name"] for j in h.jobs(ns, run)}

    h.patch_spec(ns, run, {"students": [{"model": "resnet34"}, {"model": "resnet50", "epochs": 3}]})
    status = h.wait_run(ns, run, lambda s: s.get("stage") == "Training" and s.get("generation") == 2, STEP,
                        "the last student training again")
    assert not is_true(status, "Succeeded") and status["observedGeneration"] == 2
    job = h.next_job(ns, run, set(before), STEP)
    assert job_stage(job) == Stage(2, STUDENT) and job_config(job)["epochs"] == 3
    h.complete(ns, job)
    export = h.next_job(ns, run, before | {job["metadata"]["name"]}, STEP)  # it reads the new student
    assert job_stage(export) == Stage(2, EXPORT)
    h.complete(ns, export)
    status = h.wait_run(ns, run, lambda s: s.get("stage") == "Succeeded", STEP, "Succeeded again")
    assert new_jobs(h, ns, run, before) == sorted([job["metadata"]["name"], export["metadata"]["name"]])
    assert status["generations"][2]["key"] == job["metadata"]["labels"]["noisystudent.dev/stage-key"]
    assert status["observedGeneration"] == h.get_run(ns, run)["metadata"]["generation"]


def test_a_recreated_run_with_another_teacher_trains_it_and_reports_its_marker(h, ns, s3_prefix):
    run = "recreated"
    h.create_run(ns, run, spec(s3_prefix, students=1))
    first = run_to_succeeded(h, ns, run)
    h.delete_run(ns, run)
    wait_for(lambda: h.get_run(ns, run) is None, STEP, f"run {run} to disappear")

    # Deleting a run leaves its Volcano Jobs to the garbage collector (which this server lacks).
    old = {j["metadata"]["name"] for j in h.jobs(ns, run)}
    h.create_run(ns, run, spec(s3_prefix, students=1, teacher={"model": "resnet34", "epochs": 1}))
    teacher = h.next_job(ns, run, old, STEP)
    assert job_stage(teacher) == Stage(0, TEACHER)
    assert teacher["metadata"]["name"] != next(j["name"] for j in first["jobs"] if j["stage"] == "teacher")
    layout = h.layout(ns, run)
    metrics = {"top1": 0.6125, "top5": 0.9, "parameters": 21_797_672}
    h.write_marker(layout, Stage(0, TEACHER), metrics)
    h.set_phase(ns, teacher["metadata"]["name"], "Completed")
    status = h.wait_run(ns, run, lambda s: s.get("stage") == "Labeling", STEP, "Labeling with the new teacher")
    generation = status["generations"][0]
    assert (generation["model"], generation["top1"], generation["parameters"]) == ("resnet34", 0.6125, 21_797_672)


def test_an_artifacts_uri_edit_runs_the_stages_at_the_new_location(h, ns, s3_prefix):
    run = "moved"
    h.create_run(ns, run, spec(s3_prefix, students=1))
    run_to_succeeded(h, ns, run)
    before = {j["metadata"]["name"] for j in h.jobs(ns, run)}
    moved = s3_prefix + "moved/"
    h.patch_spec(ns, run, {"artifacts": {"uri": moved}})
    status = h.wait_run(ns, run, lambda s: s.get("stage") == "Training" and s.get("observedGeneration") == 2,
                        STEP, "the teacher training at the new location")
    assert not is_true(status, "Failed"), condition(status, "Failed")
    teacher = h.next_job(ns, run, before, STEP)
    assert job_config(teacher)["output"].startswith(f"{moved}{ns}/stages/teacher/")
    h.complete(ns, teacher)
    seen = before | {teacher["metadata"]["name"]}
    for _ in range(4):  # label, balance, student, export
        h.complete(ns, h.next_job(ns, run, seen, STEP))
    status = h.wait_run(ns, run, lambda s: s.get("stage") == "Succeeded", STEP, "Succeeded at the new location")
    assert status["artifacts"] == f"{moved}{ns}/{run}/"


def test_a_retry_after_a_spec_change_never_resumes_the_old_specs_checkpoints(h, ns, s3_prefix):
    run = "retried"
    h.create_run(ns, run, spec(s3_prefix, students=1, retry={"limit": 3, "backoffSeconds": 30}))
    teacher = h.next_job(ns, run, set(), STEP)
    old_output = job_config(teacher)["output"]
    h.set_phase(ns, teacher["metadata"]["name"], "Running")
    h.set_phase(ns, teacher["metadata"]["name"], "Failed")
    h.wait_run(ns, run, lambda s: s.get("nextRetryAt") is not None, STEP, "a scheduled retry")
    h.patch_spec(ns, run, {"training": {"learningRate": 0.01}})
    retry = h.next_job(ns, run, {teacher["metadata"]["name"]}, STEP)
    config = job_config(retry)
    # Epoch checkpoints live under the output, and the output under the key of the new spec.
    assert config["lr"] == 0.01 and config["output"] != old_output
    assert retry["metadata"]["labels"]["noisystudent.dev/attempt"] == "0"  # a new stage, a fresh budget


def test_removing_a_student_while_its_job_runs_cancels_that_job(h, ns, s3_prefix):
    run = "shrunk"
    h.create_run(ns, run, spec(s3_prefix, students=2))
    seen: set[str] = set()
    for _ in range(4):  # teacher, then label, balance and student of generation 1
        h.complete(ns, h.next_job(ns, run, seen, STEP))
    label = h.next_job(ns, run, seen, STEP)
    assert job_stage(label) == Stage(2, LABEL)
    h.set_phase(ns, label["metadata"]["name"], "Running")
    h.wait_run(ns, run, lambda s: s.get("stage") == "Labeling" and s.get("generation") == 2, STEP, "Labeling g2")

    h.patch_spec(ns, run, {"students": [{"model": "resnet34"}]})
    # A cancel deletes the Volcano Job (foreground: its pods first), see docs/lifecycle.md.
    wait_for(lambda: h.job(ns, label["metadata"]["name"]) is None, STEP, "the removed student's label job to be gone")
    export = h.next_job(ns, run, seen, STEP)  # the one student left is the last: export the best model
    assert job_stage(export) == Stage(1, EXPORT)
    h.complete(ns, export)
    status = h.wait_run(ns, run, lambda s: s.get("stage") == "Succeeded", STEP, "Succeeded with one student")
    assert [j["state"] for j in status["jobs"] if j["name"] == label["metadata"]["name"]] == ["Cancelled"]


def jobs_of_kind(h: Harness, ns: str, kind: str) -> list[dict[str, Any]]:
    """Volcano Jobs of a stage kind in `ns`, whichever run created them."""
    return [j for j in h.jobs(ns) if job_stage(j).kind == kind]


def test_two_runs_with_the_same_teacher_run_one_teacher_job(h, ns, s3_prefix):
    h.create_run(ns, "left", spec(s3_prefix, students=1))
    h.create_run(ns, "right", spec(s3_prefix, students=1, pseudoLabels={"type": "hard"}))
    teacher = wait_for(lambda: (jobs_of_kind(h, ns, "teacher") or [None])[0], STEP, "a teacher job")
    name = teacher["metadata"]["name"]
    for run in ("left", "right"):
        h.wait_run(ns, run, lambda s: any(j["name"] == name for j in s.get("jobs", [])), STEP,
                   f"{run} to watch the teacher job")
    time.sleep(2)  # two operator intervals: a second teacher job would have been created by now
    assert [j["metadata"]["name"] for j in jobs_of_kind(h, ns, "teacher")] == [name]
    h.complete(ns, teacher)
    for run in ("left", "right"):
        status = h.wait_run(ns, run, lambda s: s.get("stage") == "Labeling", STEP, f"{run} labeling")
        assert status["generations"][0]["top1"] == stage_metrics(Stage(0, TEACHER))["top1"]
    # Label and balance are shared too; only the students differ (soft versus hard labels).
    time.sleep(2)
    assert len(jobs_of_kind(h, ns, "label")) == 1


def test_stored_spec_and_status_with_fields_of_a_newer_version_do_not_fail_the_run(h, cluster, ns, s3_prefix):
    """A rollback: the CRD (and stored objects) know a field that this operator does not."""
    original = run_crd()
    newer = copy.deepcopy(original)
    schema = newer["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    schema["spec"]["properties"]["futureFeature"] = {"type": "string"}
    schema["status"]["properties"]["futureCounter"] = {"type": "integer"}
    apply_crds(cluster.client, [newer])
    try:
        run = "from-the-future"
        h.create_run(ns, run, {**spec(s3_prefix, students=1), "futureFeature": "on"})
        assert h.get_run(ns, run)["spec"]["futureFeature"] == "on"  # stored, not pruned
        teacher = wait_for(lambda: (jobs_of_kind(h, ns, "teacher") or [None])[0], STEP, "a teacher job")
        h.custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, ns, PLURAL, run, {"status": {"futureCounter": 3}})
        h.complete(ns, teacher)
        status = h.wait_run(ns, run, lambda s: s.get("stage") == "Labeling", STEP, "Labeling")
        assert not is_true(status, "Failed"), condition(status, "Failed")
        assert status.get("futureCounter") == 3  # what the operator does not know, it leaves alone
    finally:
        apply_crds(cluster.client, [original])


def test_gc_keeps_what_the_runs_in_the_api_server_reference(h, cluster, ns, s3_prefix):
    """`noisy-student gc` without run files: the live runs are those of the API server."""
    import os
    import subprocess
    import sys

    from noisy_student_workloads.store import open_store

    run = "collected"
    h.create_run(ns, run, spec(s3_prefix, students=1))
    layout = h.layout(ns, run)
    store = open_store(s3_prefix)
    for stage in layout.keys:
        store.put_bytes(layout.stage_uri(stage, "out.bin"), b"x" * 10)
    orphan = f"{layout.root}/stages/teacher/{'0' * 16}/"
    store.put_bytes(orphan + "checkpoint.pt", b"x" * 2048)
    env = {**os.environ, "KUBECONFIG": str(cluster.server.kubeconfig)}
    cli = [sys.executable, "-m", "noisy_student_operator.cli", "gc", "-o", "json"]
    listed = json.loads(subprocess.run(cli, env=env, capture_output=True, text=True, check=True).stdout)
    mine = [d for d in listed if d["uri"].startswith(layout.root + "/")]
    assert [(d["uri"], d["bytes"], d["complete"]) for d in mine] == [(orphan, 2048, False)]
    subprocess.run([*cli, "--yes"], env=env, capture_output=True, text=True, check=True)
    assert not store.exists(orphan + "checkpoint.pt")
    assert all(store.exists(layout.stage_uri(stage, "out.bin")) for stage in layout.keys)
