"""The dev cluster's real kubelet (NSO_DEV_KUBELET=podman): pods that Volcano creates run as containers.

A private control plane whose kubelet runs each pod's containers with podman
(scripts/dev-cluster.d/nso-dev/podman.go), from Debian's bookworm-slim that
scripts/images makes with debootstrap: a Volcano Job applied with kubectl gets
real containers that reach each other by the host names Volcano's svc plugin
gives them, read a Secret through envFrom and a ServiceAccount token that
works against the API server, run as the securityContext says, and end the
Job Completed or Failed through Volcano's own controller; TorchX's own
Volcano Job of two torchrun nodes in the workloads image rendezvous by those
host names. Needs podman as root: skipped without it, a failure under CI=true
(the images are made by scripts/images when missing).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_server import (
    ApiServer,
    container_logs,
    fresh_namespace,
    kubectl_runner,
    podman_cluster,
    project_image,
)
from operator_harness import Harness, OperatorProcess, apply_crds, free_port, run_crd, wait_for
from s3_server import S3Server

pytestmark = [pytest.mark.integration, pytest.mark.containers]

RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
# What Pod Security's restricted level asks of a container, and a read-only root filesystem.
SECURE = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "readOnlyRootFilesystem": True}
POD_SECURITY = {"runAsUser": 1000, "runAsGroup": 1000, "runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


def podman(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def base_image() -> str:
    """Debian's bookworm-slim, made with debootstrap (no registry is reachable)."""
    return project_image("base")


@pytest.fixture(scope="module")
def cluster(base_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    with podman_cluster(tmp_path_factory.mktemp("podman-kubelet")) as server:
        yield server


@pytest.fixture(scope="module")
def client(cluster: ApiServer) -> Any:
    return cluster.api_client()


@pytest.fixture(scope="module")
def kubectl(cluster: ApiServer):
    return kubectl_runner(cluster)


def apply(kubectl, namespace: str, *documents: dict[str, Any]) -> None:
    applied = kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(documents))
    assert applied.returncode == 0, applied.stderr


def get(kubectl, namespace: str, kind: str, name: str) -> dict[str, Any]:
    got = kubectl("get", kind, name, "-n", namespace, "-o", "json")
    return json.loads(got.stdout) if got.returncode == 0 else {}


def volcano_job(name: str, replicas: int, script: str, image: str, **pod: Any) -> dict[str, Any]:
    """A Volcano Job of one task `worker` whose containers run `script` with bash."""
    return {
        "apiVersion": "batch.volcano.sh/v1alpha1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "schedulerName": "volcano",
            "queue": "default",
            "minAvailable": replicas,
            "plugins": {"svc": [], "env": []},
            "tasks": [{"name": "worker", "replicas": replicas, "template": {"spec": {
                "restartPolicy": "Never",
                "securityContext": POD_SECURITY,
                "containers": [{"name": "main", "image": image, "command": ["bash", "-c", script],
                                "securityContext": SECURE, "resources": {"requests": {"cpu": "100m"}}}],
                **pod,
            }}}],
        },
    }


def job_ends(kubectl, namespace: str, name: str, phase: str, cluster: ApiServer, timeout: float = 120) -> dict[str, Any]:
    return wait_for(
        lambda: (job := get(kubectl, namespace, "vcjob", name)).get("status", {}).get("state", {}).get("phase") == phase
        and job,
        timeout, f"Volcano Job {name} {phase}",
        detail=lambda: f"{kubectl('get', 'pods', '-n', namespace, '-o', 'wide').stdout}\n{container_logs(cluster, namespace)}",
    )


def log_lines(cluster: ApiServer, namespace: str, pod: str) -> list[str]:
    return [line for block in container_logs(cluster, namespace).split("--- ") if block.startswith(f"{pod}/")
            for line in block.splitlines()[1:]]


PAIR = r"""
set -eu
echo "index=$VC_TASK_INDEX hosts=$VC_WORKER_HOSTS uid=$(id -u)"
if touch /written 2>/dev/null; then echo "the root filesystem is writable"; exit 10; fi
echo fine >/tmp/written && echo "tmp writable"
echo "secret-sha256=$(printf %s "$ACCESS_KEY" | sha256sum | cut -d' ' -f1)"
sa=/var/run/secrets/kubernetes.io/serviceaccount
claims=$(cut -d. -f2 "$sa/token" | tr '_-' '/+'); while [ $((${#claims} % 4)) != 0 ]; do claims="$claims="; done
echo "token-claims=$(printf %s "$claims" | base64 -d)"
echo "namespace-file=$(cat $sa/namespace) api=$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT"
exec 3<>"/dev/tcp/$KUBERNETES_SERVICE_HOST/$KUBERNETES_SERVICE_PORT" && exec 3>&- && echo "api reachable"
first=${VC_WORKER_HOSTS%%,*}
for host in ${VC_WORKER_HOSTS//,/ }; do getent hosts "$host.$NAMESPACE.svc.cluster.local" >/dev/null; done
if [ "$VC_TASK_INDEX" = 0 ]; then
  perl -MIO::Socket::INET -e '
    my $s = IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => $ENV{PORT}, Listen => 1, ReuseAddr => 1)
      or die "listen: $!";
    my $c = $s->accept; my $line = <$c>; print "got: $line";'
else
  for _ in $(seq 120); do exec 3<>"/dev/tcp/$first/$PORT" 2>/dev/null && break; sleep 0.5; done
  echo "hello from $(hostname)" >&3 && echo "sent to $first"
fi
"""


def test_a_volcano_jobs_pods_run_as_containers_and_reach_each_other(
    cluster: ApiServer, client: Any, kubectl, base_image: str
) -> None:
    namespace = fresh_namespace(client, RESTRICTED)
    key = uuid.uuid4().hex
    job = volcano_job("pair", 2, PAIR, base_image, volumes=[{"name": "tmp", "emptyDir": {}}])
    container = job["spec"]["tasks"][0]["template"]["spec"]["containers"][0]
    container["volumeMounts"] = [{"name": "tmp", "mountPath": "/tmp"}]
    container["envFrom"] = [{"secretRef": {"name": "creds"}}]
    container["env"] = [{"name": "PORT", "value": str(free_port())},
                        {"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}]
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"ACCESS_KEY": key}}
    apply(kubectl, namespace, secret, job)

    job_ends(kubectl, namespace, "pair", "Completed", cluster)
    pods = {p: get(kubectl, namespace, "pod", p) for p in ("pair-worker-0", "pair-worker-1")}
    for name, pod in pods.items():
        assert pod["status"]["phase"] == "Succeeded"
        assert pod["status"]["podIP"] == pod["status"]["hostIP"] == "127.0.0.1"
        state = pod["status"]["containerStatuses"][0]
        assert state["state"]["terminated"]["exitCode"] == 0 and state["containerID"].startswith("podman://")
        lines = log_lines(cluster, namespace, name)
        text = "\n".join(lines)
        assert "uid=1000" in text and "tmp writable" in text and "api reachable" in text, text
        assert f"secret-sha256={hashlib.sha256(key.encode()).hexdigest()}" in lines, text
        claims = json.loads(next(line for line in lines if line.startswith("token-claims="))[len("token-claims="):])
        assert claims["kubernetes.io"]["pod"]["name"] == name
        assert claims["sub"] == f"system:serviceaccount:{namespace}:default"
        assert f"namespace-file={namespace}" in text
    # worker-1 reached worker-0 by the name Volcano's svc plugin gives it.
    assert "sent to pair-worker-0.pair" in log_lines(cluster, namespace, "pair-worker-1")
    assert "got: hello from pair-worker-1" in log_lines(cluster, namespace, "pair-worker-0")
    assert podman("ps", "-a", "-q", "--filter", f"label=io.kubernetes.pod.namespace={namespace}").stdout == ""

    # The mounted token, CA and API address are what an in-cluster client uses: they work.
    from kubernetes import client as k8s

    volume = next((cluster.run_dir / "kubelet" / "pods" / pods["pair-worker-0"]["metadata"]["uid"] / "volumes")
                  .glob("kube-api-access-*"))
    config = k8s.Configuration()
    config.host = f"https://127.0.0.1:{cluster.url.rsplit(':', 1)[1]}"
    config.ssl_ca_cert = str(volume / "ca.crt")
    config.api_key = {"authorization": f"Bearer {(volume / 'token').read_text()}"}
    review = k8s.AuthenticationV1Api(k8s.ApiClient(config)).create_self_subject_review({})
    assert review.status.user_info.username == f"system:serviceaccount:{namespace}:default"


def test_a_failing_container_fails_the_job_with_its_exit_code_and_message(
    cluster: ApiServer, client: Any, kubectl, base_image: str
) -> None:
    namespace = fresh_namespace(client, RESTRICTED)
    job = volcano_job("failing", 1, "echo 'stage failed: no space left' >/dev/termination-log; exit 3", base_image)
    spec = job["spec"]["tasks"][0]["template"]["spec"]
    spec["containers"].append({
        "name": "logs", "image": base_image, "terminationMessagePolicy": "FallbackToLogsOnError",
        "command": ["bash", "-c", "echo first; printf 'a partial '; sleep 0.2; echo line; exit 4"],
        "securityContext": SECURE})
    apply(kubectl, namespace, job)

    job_ends(kubectl, namespace, "failing", "Failed", cluster)
    pod = get(kubectl, namespace, "pod", "failing-worker-0")
    assert pod["status"]["phase"] == "Failed"
    terminated = {s["name"]: s["state"]["terminated"] for s in pod["status"]["containerStatuses"]}
    assert (terminated["main"]["exitCode"], terminated["main"]["reason"]) == (3, "Error")
    assert terminated["main"]["message"] == "stage failed: no space left\n"
    assert (terminated["logs"]["exitCode"], terminated["logs"]["message"]) == (4, "first\na partial line")


def test_missing_image_restarts_and_deletion_with_grace(cluster: ApiServer, client: Any, kubectl, base_image: str) -> None:
    namespace = fresh_namespace(client)

    def pod(name: str, script: str, image: str = base_image, **spec: Any) -> dict[str, Any]:
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": {
            "schedulerName": "volcano", "containers": [{"name": "main", "image": image, "command": ["bash", "-c", script],
                                                        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
            "volumes": [{"name": "scratch", "emptyDir": {}}], **spec}}

    apply(kubectl, namespace,
          pod("absent", "true", image="localhost/nso-dev-absent:1"),
          # Fails once (its emptyDir outlives the container), then succeeds.
          pod("flaky", "[ -e /scratch/tried ] && exit 0; touch /scratch/tried; exit 1", restartPolicy="OnFailure"),
          pod("sleeper", "trap 'echo stopping gracefully; exit 0' TERM; echo up; while true; do sleep 0.1; done",
              terminationGracePeriodSeconds=10))
    detail = lambda: f"{kubectl('get', 'pods', '-n', namespace).stdout}\n{container_logs(cluster, namespace)}"  # noqa: E731

    def waiting(name: str) -> dict[str, Any]:
        statuses = get(kubectl, namespace, "pod", name).get("status", {}).get("containerStatuses") or [{}]
        return statuses[0].get("state", {}).get("waiting") or {}

    absent = wait_for(lambda: waiting("absent").get("reason") in ("ErrImagePull", "ImagePullBackOff")
                      and waiting("absent"), 60, "the absent image's pull error", detail=detail)
    assert "localhost/nso-dev-absent:1" in absent["message"] and "podman storage" in absent["message"]
    assert get(kubectl, namespace, "pod", "absent")["status"]["phase"] == "Pending"

    flaky = wait_for(lambda: (p := get(kubectl, namespace, "pod", "flaky"))["status"].get("phase") == "Succeeded" and p,
                     60, "the flaky pod Succeeded after a restart", detail=detail)
    status = flaky["status"]["containerStatuses"][0]
    assert status["restartCount"] == 1 and status["lastState"]["terminated"]["exitCode"] == 1

    wait_for(lambda: "up" in log_lines(cluster, namespace, "sleeper"), 60, "the sleeper running", detail=detail)
    assert get(kubectl, namespace, "pod", "sleeper")["status"]["conditions"]
    deleted = kubectl("delete", "pod", "sleeper", "-n", namespace, "--timeout=60s")
    assert deleted.returncode == 0, deleted.stderr
    assert "stopping gracefully" in log_lines(cluster, namespace, "sleeper")  # SIGTERM, not SIGKILL
    assert podman("ps", "-a", "-q", "--filter", "label=io.kubernetes.pod.name=sleeper").stdout == ""


ALL_REDUCE = """\
import socket

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
value = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(value)
print(f"rank {dist.get_rank()} of {dist.get_world_size()} on {socket.gethostname()}: sum {value.item():g}", flush=True)
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def workloads_image(base_image: str) -> str:
    """The project's workloads image (a cold build downloads torch: gigabytes)."""
    return project_image("workloads")


@pytest.mark.timeout(3600)
def test_a_torchx_job_of_two_nodes_rendezvous_by_volcano_host_names(
    cluster: ApiServer, client: Any, kubectl, workloads_image: str
) -> None:
    """TorchX's own Volcano Job (dist.torchrun, 2 nodes × 1 process): rank 1 finds rank 0 by its svc host name."""
    from kubernetes.client import ApiClient
    from torchx.components.dist import torchrun
    from torchx.schedulers.kubernetes_scheduler import app_to_resource

    namespace = fresh_namespace(client)
    app = torchrun(script="/nso-test/all_reduce.py", image=workloads_image, name="allreduce", cpu=1, memMB=2048,
                   j="2x1", rdzv_port=free_port())
    job = ApiClient().sanitize_for_serialization(app_to_resource(app, "default", None))
    for task in job["spec"]["tasks"]:
        pod = task["template"]["spec"]
        pod["volumes"].append({"name": "script", "configMap": {"name": "all-reduce"}})
        pod["containers"][0]["volumeMounts"].append({"name": "script", "mountPath": "/nso-test"})
    script = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "all-reduce"},
              "data": {"all_reduce.py": ALL_REDUCE}}
    apply(kubectl, namespace, script, job)
    name = job["metadata"]["name"]

    # Each rank imports torch: a minute on two busy cores.
    job_ends(kubectl, namespace, name, "Completed", cluster, timeout=600)
    text = container_logs(cluster, namespace)
    for rank in (0, 1):
        assert f"rank {rank} of 2 on {name}-allreduce-{rank}-0: sum 3" in text, text
    # rank 1 was pointed at rank 0 by the svc plugin's host name, not at localhost
    assert "--rdzv_endpoint ${VC_ALLREDUCE_0_HOSTS:=localhost}" in job["spec"]["tasks"][1]["template"]["spec"]["containers"][0]["command"][-1]


def test_a_deployments_pod_runs(cluster: ApiServer, client: Any, kubectl, base_image: str) -> None:
    """Pods of the default scheduler (a Deployment's, like the operator's) are scheduled by Volcano and run."""
    namespace = fresh_namespace(client, RESTRICTED)
    labels = {"app": "web"}
    apply(kubectl, namespace, {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {
        "replicas": 1, "selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {
            "securityContext": POD_SECURITY,
            "containers": [{"name": "main", "image": base_image, "command": ["sleep", "infinity"],
                            "securityContext": SECURE}]}}}})
    rollout = kubectl("rollout", "status", "deployment/web", "-n", namespace, "--timeout=90s")
    assert rollout.returncode == 0, f"{rollout.stderr}\n{kubectl('get', 'pods', '-n', namespace, '-o', 'yaml').stdout}"
    pods = json.loads(kubectl("get", "pods", "-n", namespace, "-o", "json").stdout)["items"]
    assert [p["spec"]["schedulerName"] for p in pods] == ["default-scheduler"]
    assert [p["status"]["phase"] for p in pods] == ["Running"]


@pytest.fixture(scope="module")
def operator(cluster: ApiServer, s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """The operator (`noisy-student operator --all-namespaces`) as a process on this host, against the cluster."""
    apply_crds(cluster.api_client(), [run_crd()])
    directory = tmp_path_factory.mktemp("operator")
    process = OperatorProcess(cluster.kubeconfig, directory / "operator.log", env=s3_server.env())
    process.start()
    yield process
    process.stop()


def run_spec(s3_prefix: str, image: str, **overrides: Any) -> dict[str, Any]:
    """A small run whose first stage is the teacher (its data is never read), in the Secret `s3`'s namespace."""
    return {
        "data": {"numClasses": 10, "imageSize": 16, "labeled": "s3://datasets/digits/labeled-000000.tar",
                 "unlabeled": "s3://datasets/digits/unlabeled-000000.tar",
                 "validation": "s3://datasets/digits/test-000000.tar"},
        "artifacts": {"uri": s3_prefix, "secretRef": {"name": "s3"}},
        "teacher": {"model": "test_resnet", "epochs": 1},
        "students": [{"model": "test_resnet"}],
        "resources": {"image": image, "cpu": 1, "memoryMiB": 2048, "workers": 0, "labelShards": 1},
        "scheduler": {"name": "kubernetes", "queue": "default"},
        **overrides,
    }


def run_namespace(client: Any, kubectl, s3_server: S3Server) -> str:
    """A fresh namespace with the Secret `s3`, from which `run_spec`'s pods read their S3 credentials."""
    namespace = fresh_namespace(client)
    apply(kubectl, namespace, {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3"},
                               "stringData": s3_server.env()})
    return namespace


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def test_a_run_whose_image_is_missing_says_so_then_hits_the_pending_timeout(
    cluster: ApiServer, client: Any, kubectl, operator: OperatorProcess, s3_prefix: str, s3_server: S3Server
) -> None:
    """The kubelet's own ErrImagePull/ImagePullBackOff reaches the run's JobPending message; with
    pendingTimeoutSeconds the run fails PendingTimeout and its Volcano Job goes with its pods."""
    namespace = run_namespace(client, kubectl, s3_server)
    image = f"localhost/nso-dev-absent:{uuid.uuid4().hex[:8]}"
    h = Harness(client, operator)
    run = "no-image"
    h.create_run(namespace, run, run_spec(s3_prefix, image, pendingTimeoutSeconds=20))
    job = h.next_job(namespace, run, set(), 120)["metadata"]["name"]

    status = h.wait_run(namespace, run, lambda s: any(
        pull in (condition(s, "Ready").get("message") or "") for pull in ("ErrImagePull", "ImagePullBackOff")), 60,
        "JobPending quoting the image pull error")
    ready = condition(status, "Ready")
    assert ready["reason"] == "JobPending" and image in ready["message"], ready
    assert [j["state"] for j in status["jobs"] if j["name"] == job] == ["Pending"], status["jobs"]

    status = h.wait_run(namespace, run, lambda s: s.get("stage") == "Failed", 90, "PendingTimeout")
    failed = condition(status, "Failed")
    assert failed["status"] == "True" and failed["reason"] == "PendingTimeout", failed
    assert "pendingTimeoutSeconds (20s)" in failed["message"] and image in failed["message"], failed
    wait_for(lambda: h.job(namespace, job) is None and not h.pods(namespace, job), 60,
             f"the timed-out job {job} and its pods to be gone",
             detail=lambda: kubectl("get", "vcjob,pods", "-n", namespace, "-o", "wide").stdout)
    assert podman("ps", "-a", "-q", "--filter", f"label=io.kubernetes.pod.namespace={namespace}").stdout == ""
    assert len(h.jobs(namespace, run)) == 0 and "<NONE>" not in json.dumps(status)


@pytest.mark.timeout(3600)
def test_a_training_stages_config_error_under_torchrun_fails_the_run_without_a_retry(
    cluster: ApiServer, client: Any, kubectl, operator: OperatorProcess, workloads_image: str, s3_prefix: str,
    s3_server: S3Server
) -> None:
    """The teacher in the workloads image, two torchrun workers, a batch of 1: each worker exits 2 with
    a ConfigError, torchrun's agent exits 1; the worker's line in the termination message (the kubelet's
    terminationMessagePath) makes the run InvalidConfig, with no second attempt."""
    namespace = run_namespace(client, kubectl, s3_server)
    h = Harness(client, operator)
    run = "bad-batch"
    h.create_run(namespace, run, run_spec(
        s3_prefix, workloads_image, training={"batchSize": 1},
        resources={**run_spec(s3_prefix, workloads_image)["resources"], "train": {"procsPerNode": 2}},
        retry={"limit": 2, "backoffSeconds": 1, "maxBackoffSeconds": 1}))
    # Each worker imports torch: a minute on two busy cores.
    status = h.wait_run(namespace, run, lambda s: s.get("stage") == "Failed", 900, "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "InvalidConfig", f"{failed}\n{container_logs(cluster, namespace)}"
    assert "exited with code 1 (Error): ConfigError: batch_size: 1 is smaller than the 2 training processes" in (
        failed["message"]), failed
    assert len(h.jobs(namespace, run)) == 1  # never retried


def test_the_kubelet_and_down_remove_every_container(cluster: ApiServer, client: Any, kubectl, base_image: str) -> None:
    namespace = fresh_namespace(client)
    apply(kubectl, namespace, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "forever"}, "spec": {
        "schedulerName": "volcano", "containers": [{"name": "main", "image": base_image, "command": ["sleep", "infinity"]}]}})
    label = f"label=io.kubernetes.pod.namespace={namespace}"
    wait_for(lambda: podman("ps", "-q", "--filter", label).stdout.strip(), 60, "the pod's container running")

    # A stopping kubelet removes the containers it started.
    kubelet = int((cluster.run_dir / "kubelet.pid").read_text())
    os.kill(kubelet, signal.SIGTERM)
    wait_for(lambda: not Path(f"/proc/{kubelet}").exists(), 30, "the kubelet to stop")
    assert podman("ps", "-a", "-q", "--filter", label).stdout == ""

    # `down` removes what a killed kubelet left behind (its containers carry its root dir).
    root = (cluster.run_dir / "kubelet").resolve()
    left = podman("run", "-d", "--runtime", "runc", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096",
                  "--label", f"dev.nso.kubelet.root={root}", base_image, "sleep", "infinity")
    assert left.returncode == 0, left.stderr
    cluster.stop()
    assert podman("ps", "-a", "-q", "--filter", f"label=dev.nso.kubelet.root={root}").stdout == ""
    assert (cluster.run_dir / "kubelet" / "logs").is_dir()
