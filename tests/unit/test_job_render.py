"""The Volcano Jobs the operator submits: pod hardening, per-stage resources, placement and passthrough.

Each stage of a run is rendered as the `kubernetes` backend renders it (TorchX's
dry run, then `patch_volcano_job`) and checked field by field, and against
Volcano's Job CRD schema: every value has the schema's type and format, and no
field would be pruned by the API server. The CRD comes from `NSO_VOLCANO_CRDS`
(a directory of Volcano's CRD YAML) or from the module `scripts/dev-cluster`
builds (`scripts/dev-cluster crds`); without either that one check is skipped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from noisy_student_operator.api import RunSpec
from noisy_student_operator.backend import JobContext, make_runner, patch_volcano_job, render_app
from noisy_student_operator.volcano import check_names
from noisy_student_operator.core.layout import BALANCE, EXPORT, LABEL, PREPARE, STUDENT, TEACHER, Stage, plan_stages
from noisy_student_operator.core.render import render_job, run_layout

BASE = {
    "data": {"labeled": "s3://d/l.tar", "unlabeled": "s3://d/u.tar", "validation": "s3://d/v.tar", "numClasses": 10},
    "artifacts": {"uri": "s3://b/runs/", "secretRef": {"name": "s3-creds"}},
    "teacher": {"model": "resnet18"},
    "students": [{"model": "resnet18"}],
}

PLACED = {
    **BASE,
    "data": {**BASE["data"], "prepare": {"source": "digits", "labelsPerClass": 10}},
    "resources": {
        "memoryMiB": 1024, "cpu": 2, "gpu": 1, "labelShards": 3,
        "train": {"nodes": {"min": 1, "max": 2}, "procsPerNode": 4, "cpu": 8, "memoryMiB": 16384, "gpu": 4},
        "label": {"cpu": 4, "memoryMiB": 6144, "gpu": 1},
        "balance": {"cpu": 1, "memoryMiB": 2048},
    },
    "placement": {
        "labels": {"cost-centre": "ml-research", "noisystudent.dev/run": "spoofed"},
        "annotations": {"example.com/owner": "team-a"},
        "priorityClassName": "batch-low",
        "nodeSelector": {"pool": "cpu"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        "imagePullSecrets": [{"name": "registry"}],
        "train": {
            "labels": {"kueue.x-k8s.io/queue-name": "gpu-train"},
            "nodeSelector": {"pool": "gpu"},
            "serviceAccountName": "trainer",
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]}}},
        },
        "label": {"labels": {"kueue.x-k8s.io/queue-name": "gpu-label"}, "priorityClassName": "batch-high"},
    },
}


def render_jobs(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every stage's Volcano Job as JSON, by stage kind (the first generation of each)."""
    from kubernetes import client

    spec = RunSpec.model_validate(document)
    layout = run_layout(spec, "ml", "demo", "image:test")
    runner = make_runner()  # the operator's
    jobs: dict[str, dict[str, Any]] = {}
    for stage in plan_stages(spec):
        if stage.kind in jobs:
            continue
        request = render_job(spec, layout, stage, 0, 1000)
        app = render_app(request, spec.resources.image, {"NSO_RUN": "ml/demo"})
        cfg = {"queue": "default", "namespace": "ml", "validate_spec": False}
        resource = runner.dryrun(app, "kubernetes", cfg=cfg).request.resource
        patch_volcano_job(resource, request, JobContext("demo", "ml", "uid-1", "s3-creds"))
        jobs[stage.kind] = client.ApiClient().sanitize_for_serialization(resource)
    return jobs


def test_the_operators_runner_builds_a_schedulers_run_options_once(monkeypatch):
    """TorchX builds a scheduler's run options (from its options class's source) on every call,
    three times a dry run: the largest part of the operator's CPU per submission at 1,000 runs.
    The operator's runner builds them once per scheduler (the tests above render with it)."""
    from torchx.schedulers.kubernetes_scheduler import KubernetesScheduler

    built = []
    original = KubernetesScheduler._run_opts
    monkeypatch.setattr(KubernetesScheduler, "_run_opts", lambda self: built.append(self) or original(self))
    spec = RunSpec.model_validate(BASE)
    layout = run_layout(spec, "ml", "demo", "image:test")
    cfg = {"queue": "default", "namespace": "ml", "validate_spec": False}
    runner = make_runner()
    for stage in plan_stages(spec)[:3]:
        app = render_app(render_job(spec, layout, stage, 0, 1000), spec.resources.image, {})
        assert runner.dryrun(app, "kubernetes", cfg=cfg).request.resource["spec"]["tasks"]
    assert len(built) == 1


def test_the_operators_runner_keeps_nothing_of_the_jobs_it_submitted(monkeypatch):
    """TorchX's `Runner.schedule` keeps every AppDef it scheduled, until a `status` finds the app
    gone; the operator never asks the runner about a Volcano Job, so with 1,000 runs its memory
    grew with every job it ever submitted."""
    from torchx.schedulers.kubernetes_scheduler import KubernetesScheduler

    from noisy_student_operator.backend import TorchXJobBackend

    created = []
    monkeypatch.setattr(KubernetesScheduler, "schedule",  # the Volcano Job's create
                        lambda self, dryrun: created.append(dryrun.request.resource) or f"ml:j{len(created)}")
    spec = RunSpec.model_validate(BASE)
    layout = run_layout(spec, "ml", "demo", "image:test")
    backend = TorchXJobBackend("kubernetes")
    for stage in plan_stages(spec):
        backend.submit(render_job(spec, layout, stage, 0, 1000), JobContext("demo", "ml", "uid-1", "s3-creds"))
    assert len(created) == len(plan_stages(spec))
    assert backend.runner._apps == {}  # TorchX's cache of what it scheduled


def pods(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [task["template"] for task in job["spec"]["tasks"]]


def containers(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for pod in pods(job) for c in pod["spec"]["containers"]]


def test_memory_is_requested_as_asked_in_mib_with_guaranteed_qos():
    """`memoryMiB: 1024` was rendered as a `1024M` limit and a `0M` request (TorchX keeps a reserve)."""
    jobs = render_jobs({**BASE, "resources": {"memoryMiB": 1024, "cpu": 3}})
    assert set(jobs) == {TEACHER, LABEL, BALANCE, STUDENT, EXPORT}
    for kind, job in jobs.items():
        for container in containers(job):
            resources = container["resources"]
            assert resources["requests"] == resources["limits"] == {"cpu": "3", "memory": "1024Mi"}, kind


def test_each_stage_gets_its_own_resources_and_balancing_never_a_gpu():
    jobs = render_jobs(PLACED)
    train = containers(jobs[TEACHER])[0]["resources"]
    assert train["requests"] == train["limits"] == {"cpu": "8", "memory": "16384Mi", "nvidia.com/gpu": "4"}
    assert "--nnodes 1:2 --nproc_per_node 4" in " ".join(containers(jobs[TEACHER])[0]["command"])
    assert jobs[STUDENT]["spec"]["tasks"][0]["template"]["spec"]["containers"][0]["resources"] == {
        "limits": train["limits"], "requests": train["requests"]}
    label = jobs[LABEL]
    assert sum(task["replicas"] for task in label["spec"]["tasks"]) == 3
    for container in containers(label):
        assert container["resources"]["limits"] == {"cpu": "4", "memory": "6144Mi", "nvidia.com/gpu": "1"}
    for kind in (BALANCE, PREPARE):
        for container in containers(jobs[kind]):
            assert container["resources"]["limits"] == container["resources"]["requests"] == {
                "cpu": "1", "memory": "2048Mi"}, kind


def test_a_label_jobs_replicas_are_one_task_each_pod_reading_its_index_from_volcano():
    """TorchX renders a task per replica, ~2 kB each: 700 shards or more made a Job etcd refuses
    to store. One task of N replicas; Volcano's env plugin gives each pod `VC_TASK_INDEX` (its
    position in the task), which the kubelet expands into `--replica-id`."""
    import json

    def label_job(shards: int) -> dict[str, Any]:
        return render_jobs({**PLACED, "resources": {**PLACED["resources"], "labelShards": shards}})[LABEL]

    job = label_job(3)
    [task] = job["spec"]["tasks"]
    assert (task["name"], task["replicas"]) == ("label", 3)
    assert "env" in job["spec"]["plugins"]  # the plugin that sets VC_TASK_INDEX
    [container] = task["template"]["spec"]["containers"]
    args = container["command"] + container.get("args", [])  # TorchX writes it all as the command
    assert args[args.index("--replica-id") + 1] == "$(VC_TASK_INDEX)"
    assert args[args.index("--num-replicas") + 1] == "3"
    assert "TORCHX_RANK0_HOST" not in {e["name"] for e in container["env"]}
    assert "torchx.pytorch.org/replica-id" not in task["template"]["metadata"]["labels"]
    for index in range(3):  # what the kubelet runs in pod `<job>-label-<index>`
        env = {e["name"]: e.get("value") for e in container["env"]} | {"VC_TASK_INDEX": str(index)}
        expanded = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]
        assert expanded[expanded.index("--replica-id") + 1] == str(index)
    # the Job's size no longer grows with its shards (1,024: 2.15 MB before)
    assert len(json.dumps(label_job(1024))) - len(json.dumps(job)) < 10
    check_names(label_job(1024))
    # other stages keep TorchX's tasks (training replicas meet at rank 0's host)
    assert [t["name"] for t in render_jobs(PLACED)[TEACHER]["spec"]["tasks"]] == ["train-0", "train-1"]


def test_pods_meet_pod_security_restricted_and_get_no_token_by_default():
    for kind, job in render_jobs(BASE).items():
        for pod in pods(job):
            spec = pod["spec"]
            assert spec["securityContext"] == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
            assert spec["automountServiceAccountToken"] is False and "serviceAccountName" not in spec, kind
            assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
            for volume in spec.get("volumes") or []:
                assert "hostPath" not in volume, volume
            for container in spec["containers"]:
                context = container["securityContext"]
                assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}
                assert not context.get("privileged") and context.get("runAsUser") != 0


def test_placement_and_passthrough_per_run_and_per_stage():
    jobs = render_jobs(PLACED)
    for kind, job in jobs.items():
        queue = {TEACHER: "gpu-train", STUDENT: "gpu-train", LABEL: "gpu-label"}.get(kind)
        for metadata in [job["metadata"]] + [pod["metadata"] for pod in pods(job)]:
            labels = metadata["labels"]
            assert labels["cost-centre"] == "ml-research"
            assert labels["noisystudent.dev/run"] == "demo"  # the operator's labels win
            assert labels.get("kueue.x-k8s.io/queue-name") == queue, kind
            assert metadata["annotations"]["example.com/owner"] == "team-a"
        priority = "batch-high" if kind == LABEL else "batch-low"
        assert job["spec"]["priorityClassName"] == priority
        for pod in pods(job):
            spec = pod["spec"]
            assert spec["priorityClassName"] == priority
            assert spec["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]
            assert spec["imagePullSecrets"] == [{"name": "registry"}]
            if kind in (TEACHER, STUDENT):
                assert spec["nodeSelector"] == {"pool": "gpu"}
                assert spec["serviceAccountName"] == "trainer" and spec["automountServiceAccountToken"] is True
                assert spec["affinity"]["nodeAffinity"]
            else:
                assert spec["nodeSelector"] == {"pool": "cpu"}
                assert spec["automountServiceAccountToken"] is False and "affinity" not in spec


def test_placement_is_not_part_of_a_stage_key():
    def keys(document):
        spec = RunSpec.model_validate(document)
        return run_layout(spec, "ml", "demo", "image:test").keys

    moved = {**BASE, "placement": PLACED["placement"],
             "resources": {"memoryMiB": 9000, "cpu": 7, "balance": {"cpu": 3}}}
    assert keys(moved) == keys(BASE)
    assert keys({**BASE, "resources": {"train": {"gpu": 1}}})[Stage(0, TEACHER)] != keys(BASE)[Stage(0, TEACHER)]


def test_training_compile_reaches_the_training_configs_and_their_keys_only_when_set():
    from noisy_student_operator.core.render import render_train_config
    from noisy_student_workloads.config import TrainConfig

    def rendered(document):
        spec = RunSpec.model_validate(document)
        layout = run_layout(spec, "ml", "demo", "image:test")
        return layout.keys, [render_train_config(spec, layout, g, 10**6) for g in (0, 1)]

    keys, configs = rendered(BASE)
    compiled_keys, compiled = rendered({**BASE, "training": {"compile": True}})
    assert not any("compile" in c for c in configs)  # the keys of runs that never set it are unchanged
    assert all(TrainConfig.model_validate(c).compile for c in compiled)
    assert compiled_keys[Stage(0, TEACHER)] != keys[Stage(0, TEACHER)]


def test_allowing_a_smaller_student_reaches_its_job_but_not_the_training_keys():
    from noisy_student_operator.core.render import render_train_config

    spec = RunSpec.model_validate({**BASE, "training": {"allowSmallerStudent": True}})
    layout = run_layout(spec, "ml", "demo", "image:test")
    plain = run_layout(RunSpec.model_validate(BASE), "ml", "demo", "image:test")
    assert render_train_config(spec, layout, 1, 10**6)["allow_smaller_student"] is True
    assert layout.keys[Stage(1, STUDENT)] == plain.keys[Stage(1, STUDENT)]


def test_a_student_started_from_its_teacher_is_given_the_checkpoint_of_the_teachers_stage():
    from noisy_student_operator.core.render import render_train_config
    from noisy_student_workloads.config import TrainConfig

    document = {**BASE, "students": [{"model": BASE["teacher"]["model"], "init": "teacher"}, BASE["teacher"]]}
    spec = RunSpec.model_validate(document)
    layout = run_layout(spec, "ml", "demo", "image:test")
    first, second = (TrainConfig.model_validate(render_train_config(spec, layout, g, 10**6)) for g in (1, 2))
    assert first.init == layout.checkpoint_uri(0) and layout.keys[Stage(0, TEACHER)] in first.init
    assert second.init is None and "init" not in render_train_config(spec, layout, 0, None)


# ----------------------------------------------------------------------------- Volcano's CRD


def volcano_job_schema() -> dict[str, Any]:
    candidates = [os.environ.get("NSO_VOLCANO_CRDS")]
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    candidates.append(str(cache / "noisy-student" / "dev-cluster" / "bin" / "volcano-crds"))
    for directory in filter(None, candidates):
        path = Path(directory) / "batch.volcano.sh_jobs.yaml"
        if path.is_file():
            crd = yaml.safe_load(path.read_text())
            version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
            return version["schema"]["openAPIV3Schema"]
    pytest.skip("Volcano's CRDs not found: set NSO_VOLCANO_CRDS or run scripts/dev-cluster build")


def schema_problems(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """What the API server would reject (type, enum, pattern, required) or prune (unknown fields)."""
    if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
        return []
    if schema.get("x-kubernetes-int-or-string") or "anyOf" in schema:
        ok = isinstance(value, (int, str)) and not isinstance(value, bool)
        if ok and isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
            return [f"{path}: {value!r} does not match {schema['pattern']}"]
        return [] if ok else [f"{path}: {value!r} is not an int or string"]
    kind = schema.get("type")
    expected = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int, "number": (int, float)}
    if kind and not isinstance(value, expected[kind]) or kind in ("integer", "number") and isinstance(value, bool):
        return [f"{path}: {value!r} is not of type {kind}"]
    problems = []
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{path}: {value!r} not in {schema['enum']}")
    if kind == "object":
        properties = schema.get("properties")
        for name in schema.get("required", []):
            if name not in value:
                problems.append(f"{path}.{name}: required")
        for name, item in value.items():
            if properties is not None and name in properties:
                problems += schema_problems(item, properties[name], f"{path}.{name}")
            elif isinstance(schema.get("additionalProperties"), dict):
                problems += schema_problems(item, schema["additionalProperties"], f"{path}.{name}")
            elif properties is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                problems.append(f"{path}.{name}: unknown field (the API server would prune it)")
    if kind == "array":
        for index, item in enumerate(value):
            problems += schema_problems(item, schema.get("items", {}), f"{path}[{index}]")
    return problems


def test_schema_check_finds_what_the_server_would_reject_or_prune():
    schema = volcano_job_schema()
    job = render_jobs(BASE)[TEACHER]
    job["spec"]["tasks"][0]["template"]["spec"]["priorityClassNam"] = "typo"
    job["spec"]["tasks"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "1 GiB"
    problems = schema_problems(job, schema)
    assert any("priorityClassNam: unknown field" in p for p in problems), problems
    assert any("limits.memory" in p for p in problems), problems


@pytest.mark.parametrize("document", [BASE, PLACED], ids=["defaults", "per-stage-placement"])
def test_rendered_jobs_fit_volcanos_job_schema(document):
    schema = volcano_job_schema()
    for kind, job in render_jobs(document).items():
        assert schema_problems(job, schema) == [], kind
