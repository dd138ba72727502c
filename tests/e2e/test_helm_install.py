"""The user's path, end to end, with real containers.

`helm install` of the chart into a private control plane whose kubelet runs
pods with podman (scripts/dev-cluster, NSO_DEV_KUBELET=podman), the operator
running from its image as the chart's pod with exactly the chart's RBAC
(enforced: its requests carry its ServiceAccount's token), `kubectl apply -f`
of a small run file, Volcano creating the stage pods, the stages running in
the workloads image (a student trained by two torchrun nodes that meet by the
host names Volcano's svc plugin gives them), artifacts on the S3 server, the
run Succeeded, and `kubectl get nsr` / `kubectl describe nsr` as a user reads
them. The images come from scripts/images (built by scripts/test before
pytest; here a cached no-op). Needs podman as root: skipped without it, a
failure under CI=true.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from conftest import skip_or_fail
from kube_server import (
    REPO_ROOT,
    ApiServer,
    container_logs,
    ensure_namespace,
    kubectl_runner,
    podman_cluster,
    project_image,
)
from operator_harness import free_port, wait_for
from s3_server import S3Server

pytestmark = [pytest.mark.e2e, pytest.mark.containers, pytest.mark.timeout(2400)]

CHART = REPO_ROOT / "charts" / "noisy-student-operator"
RELEASE, OPERATOR_NAMESPACE = "nso", "noisy-system"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}


def helm_binary() -> Path:
    done = subprocess.run([str(REPO_ROOT / "scripts" / "get-helm"), "v35"], capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        skip_or_fail(f"scripts/get-helm could not fetch helm: {done.stderr.strip()}")
    return Path(done.stdout.split()[1])


@pytest.fixture(scope="module")
def tags() -> dict[str, str]:
    """Role → image name, after a (cached) `scripts/images build`."""
    return {role: project_image(role) for role in ("operator", "workloads")}


@pytest.fixture(scope="module")
def cluster(tags: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with podman_cluster(tmp_path_factory.mktemp("helm-install")) as server:
        yield server


def s3_secret(name: str, namespace: str, s3: S3Server) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "type": "Opaque", "stringData": s3.env()}


def run_file(name: str, prefix: str, image: str) -> dict[str, Any]:
    """A small run as a user writes it: digits, one student, each stage its own Volcano Job.

    Its first attempt here (a 0.3 confidence threshold) ended as a user would
    see it: balance exited 2, the run Failed with InvalidConfig, quoting the
    workload ("confidence_threshold: 0.3 keeps no image")."""
    return {
        "apiVersion": "noisystudent.dev/v1alpha1", "kind": "NoisyStudentRun", "metadata": {"name": name},
        "spec": {
            "data": {"numClasses": 10, "imageSize": 16,
                     "prepare": {"source": "digits", "labelsPerClass": 10, "validationSize": 300, "shardSize": 400}},
            "artifacts": {"uri": prefix, "secretRef": {"name": "s3"}},
            "teacher": {"model": "test_resnet", "epochs": 1},
            "students": [{"model": "test_resnet", "epochs": 1}],
            "training": {"batchSize": 16, "unlabeledRatio": 2, "epochs": 1},
            # A one-epoch teacher is far from confident: keep every pseudo label.
            "pseudoLabels": {"confidenceThreshold": 0.0},
            # The student's job has two nodes: two pods whose torchrun agents meet at the first one's svc name.
            "resources": {"image": image, "cpu": 1, "memoryMiB": 2048, "workers": 0, "labelShards": 2,
                          "train": {"nodes": {"min": 2, "max": 2}}},
            "retry": {"limit": 0},
            "scheduler": {"name": "kubernetes", "queue": "default"},
        },
    }


def test_helm_install_then_kubectl_apply_runs_in_containers(
    cluster: ApiServer, tags: dict[str, str], s3_server: S3Server, tmp_path: Path
) -> None:
    kubectl = kubectl_runner(cluster)
    client = cluster.api_client()
    helm = helm_binary()
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    namespace = f"team-{uuid.uuid4().hex[:6]}"
    ensure_namespace(client, OPERATOR_NAMESPACE)
    ensure_namespace(client, namespace, RESTRICTED)
    for secret in (s3_secret("operator-s3", OPERATOR_NAMESPACE, s3_server), s3_secret("s3", namespace, s3_server)):
        applied = kubectl("apply", "-f", "-", input=json.dumps(secret))
        assert applied.returncode == 0, applied.stderr

    repository, tag = tags["operator"].rsplit(":", 1)
    values = {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "operator": {"s3": {"secretName": "operator-s3"}, "healthPort": free_port(), "extraArgs": ["--interval=2"]},
        "metrics": {"enabled": False},
    }
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    install = subprocess.run(
        [str(helm), "install", RELEASE, str(CHART), "--namespace", OPERATOR_NAMESPACE, "-f", str(tmp_path / "values.yaml"),
         "--wait", "--timeout", "5m"],
        capture_output=True, text=True, env=env, timeout=400)
    assert install.returncode == 0, install.stderr + container_logs(cluster, OPERATOR_NAMESPACE)

    name = "digits"
    prefix = f"s3://{s3_server.bucket}/{uuid.uuid4().hex[:12]}/"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run_file(name, prefix, tags["workloads"])))
    applied = kubectl("apply", "-n", namespace, "-f", str(tmp_path / "run.yaml"))
    assert applied.returncode == 0, applied.stderr

    def finished() -> dict[str, Any] | None:
        got = kubectl("get", "nsr", name, "-n", namespace, "-o", "json")
        status = json.loads(got.stdout).get("status", {}) if got.returncode == 0 else {}
        return status if status.get("stage") in ("Succeeded", "Failed") else None

    def logs() -> str:
        described = kubectl("describe", "nsr", name, "-n", namespace).stdout
        return f"{described}\n{container_logs(cluster, OPERATOR_NAMESPACE)}\n{container_logs(cluster, namespace)}"

    status = wait_for(finished, timeout=1800, interval=3, what=f"run {name} Succeeded or Failed", detail=logs)
    assert status["stage"] == "Succeeded", f"{json.dumps(status, indent=1)}\n{logs()}"

    # Every stage ran as a Volcano Job of real pods in the restricted namespace.
    kinds = sorted({s["stage"] for s in status["stages"]})
    assert kinds == sorted(["prepare", "teacher", "label", "balance", "student", "export"]), status["stages"]
    student = next(s for s in status["stages"] if s["stage"] == "student")
    pods = json.loads(kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
    student_pods = [p for p in pods if p["metadata"]["labels"].get("noisystudent.dev/stage") == "student"]
    # Finished jobs and their pods stay a day (`scheduler.ttlSecondsAfterFinished`).
    assert len(student_pods) == 2 and all(p["status"]["phase"] == "Succeeded" for p in student_pods), student_pods
    assert student["state"] == "Complete"

    # The artifacts are on the S3 server, the model exported.
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id=s3_server.access_key,
                      aws_secret_access_key=s3_server.secret_key, region_name=s3_server.region)
    bucket, key_prefix = prefix[len("s3://"):].split("/", 1)
    keys = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix)
            for o in page.get("Contents", [])}
    assert any(k.endswith("/model.safetensors") for k in keys), sorted(keys)[:50]
    assert status.get("model"), status

    # What a user reads.
    table = kubectl("get", "nsr", "-n", namespace)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()[:2]
    assert header.split()[:1] == ["NAME"] and "READY" in header and row.split()[0] == name
    assert "Succeeded" in row.split()
    described = kubectl("describe", "nsr", name, "-n", namespace)
    assert described.returncode == 0, described.stderr
    assert "Events:" in described.stdout and "Succeeded" in described.stdout
    for secret in (s3_server.secret_key, s3_server.access_key):
        assert secret not in described.stdout and secret not in json.dumps(status)
