"""The test control plane itself (scripts/dev-cluster): what the operator, kopf, kubectl and users rely on.

Discovery through the Kubernetes Python client, CRDs with schema validation
and the status subresource, the OpenAPI v2 document, Events; the nodes of the
fast kubelet; a Volcano Job applied with kubectl getting its pods from
Volcano's own controller and scheduler, its phase derived from them; Volcano's
webhooks; RBAC answered by `kubectl auth can-i`, Pod Security admission and
OwnerReferencesPermissionEnforcement enforced.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import skip_or_fail
from kube_server import (
    DEV_CLUSTER,
    ApiServer,
    ApiServerUnavailable,
    apply_crd,
    fresh_namespace,
    kubectl_runner,
    retry_while_initialising,
    start_api_server,
    volcano_crd_dir,
)
from operator_harness import Harness, job_phase, wait_for

pytestmark = pytest.mark.integration

GROUP = "example.nso.dev"
WIDGET_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"widgets.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "shortNames": ["wd"]},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "description": "What the widget should be.",
                                "required": ["size"],
                                "x-kubernetes-validations": [
                                    {"rule": "self.color == 'red' || self.size <= 10", "message": "blue widgets are small"}
                                ],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1, "description": "How big."},
                                    "color": {"type": "string", "enum": ["red", "blue"], "default": "red"},
                                },
                            },
                            "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
                        },
                    }
                },
            }
        ],
    },
}

VOLCANO_JOB = """\
apiVersion: batch.volcano.sh/v1alpha1
kind: Job
metadata: {name: NAME}
spec:
  schedulerName: volcano
  queue: default
  minAvailable: 2
  plugins: {svc: [], env: []}
  tasks:
    - name: worker
      replicas: 2
      template:
        spec:
          restartPolicy: Never
          containers:
            - name: main
              image: busybox
              command: ["true"]
              resources: {requests: {cpu: "1", memory: 1Gi, nvidia.com/gpu: "1"}, limits: {nvidia.com/gpu: "1"}}
"""


@pytest.fixture(scope="module")
def client(kube_api: ApiServer) -> Any:
    return kube_api.api_client()


@pytest.fixture(scope="module")
def widgets(client: Any) -> str:
    """The Widget CRD applied and usable; yields a fresh namespace name."""
    apply_crd(client, WIDGET_CRD)
    return fresh_namespace(client)


@pytest.fixture(scope="module")
def kubectl(kube_api: ApiServer):
    """Run kubectl against the cluster; returns the finished process (check=False)."""
    return kubectl_runner(kube_api)


def get(client: Any, server: ApiServer, path: str) -> bytes:
    return client.rest_client.GET(server.url + path).data


def test_readyz_and_version(kube_api: ApiServer, client: Any) -> None:
    from kubernetes import client as k8s

    assert get(client, kube_api, "/readyz") == b"ok"
    assert k8s.VersionApi(client).get_code().git_version.startswith("v1.")


def test_core_api_serves_pods_nodes_and_namespaces(client: Any) -> None:
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    assert k8s.CoreApi(client).get_api_versions().versions == ["v1"]
    resources = {r.name: r for r in k8s.CoreV1Api(client).get_api_resources().resources}
    assert {"pods", "pods/status", "nodes", "services", "serviceaccounts", "secrets"} <= set(resources)
    assert not resources["namespaces"].namespaced and resources["pods"].namespaced
    core = k8s.CoreV1Api(client)
    assert {"default", "kube-system", "volcano-system"} <= {n.metadata.name for n in core.list_namespace().items}
    with pytest.raises(ApiException) as caught:
        core.read_namespace(f"absent-{uuid.uuid4().hex[:6]}")
    assert caught.value.status == 404


def test_nodes_are_ready_with_cpu_memory_and_gpus(client: Any) -> None:
    from kubernetes import client as k8s

    nodes = k8s.CoreV1Api(client).list_node().items
    assert len(nodes) >= 2
    for node in nodes:
        ready = next(c for c in node.status.conditions if c.type == "Ready")
        assert ready.status == "True", node.metadata.name
        assert {"cpu", "memory", "pods", "nvidia.com/gpu"} <= set(node.status.allocatable)
        assert int(node.status.allocatable["nvidia.com/gpu"]) > 0


def test_a_node_marked_not_ready_is_made_ready_again_by_its_kubelet(client: Any) -> None:
    """The node lifecycle controller sets Ready to Unknown when a node's heartbeats come late (a
    loaded API server); only the kubelet sets it back, by posting the node's status, as a kubelet
    checks it every nodeStatusUpdateFrequency (10 s). Posted at registration only, a node stayed
    NotReady for good (and tainted unreachable: no pod scheduled there again)."""
    from kubernetes import client as k8s

    core = k8s.CoreV1Api(client)
    name = sorted(n.metadata.name for n in core.list_node().items)[-1]
    unknown = {"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown",
               "message": "Kubelet stopped posting node status."}
    core.patch_node_status(name, {"status": {"conditions": [unknown]}})  # merged by type

    def ready_and_untainted() -> bool:
        node = core.read_node(name)
        ready = next(c for c in node.status.conditions if c.type == "Ready")
        unreachable = [t for t in node.spec.taints or [] if t.key.startswith("node.kubernetes.io/unreachable")]
        return ready.status == "True" and not unreachable

    assert next(c for c in core.read_node(name).status.conditions if c.type == "Ready").status == "Unknown"
    wait_for(ready_and_untainted, 60, f"node {name} Ready again and its unreachable taint gone")


def test_events_are_accepted_and_listed(client: Any) -> None:
    from kubernetes import client as k8s

    core = k8s.CoreV1Api(client)
    namespace = fresh_namespace(client)
    event = {
        "metadata": {"generateName": "widget-"},
        "involvedObject": {"kind": "Widget", "name": "w", "namespace": namespace},
        "reason": "Tested",
        "message": "an event",
        "type": "Normal",
    }
    created = core.create_namespaced_event(namespace, event)
    assert created.metadata.name.startswith("widget-")
    assert [e.reason for e in core.list_namespaced_event(namespace).items] == ["Tested"]


def test_crd_is_listed_in_discovery(client: Any, widgets: str) -> None:
    from kubernetes import client as k8s

    groups = {g.name: g for g in k8s.ApisApi(client).get_api_versions().groups}
    assert {"apiextensions.k8s.io", "batch.volcano.sh", "scheduling.volcano.sh"} <= set(groups)
    assert groups[GROUP].preferred_version.version == "v1"
    resources = k8s.CustomObjectsApi(client).get_api_resources(GROUP, "v1").resources
    assert {r.name for r in resources} >= {"widgets", "widgets/status"}


def test_custom_object_crud_and_status(client: Any, widgets: str) -> None:
    from kubernetes import client as k8s

    custom = k8s.CustomObjectsApi(client)
    body = {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {"size": 3}}
    retry_while_initialising(lambda: custom.create_namespaced_custom_object(GROUP, "v1", widgets, "widgets", body))
    widget = custom.get_namespaced_custom_object(GROUP, "v1", widgets, "widgets", "w1")
    assert widget["spec"] == {"size": 3, "color": "red"}  # defaulted by the schema

    custom.patch_namespaced_custom_object(GROUP, "v1", widgets, "widgets", "w1", {"spec": {"size": 5}})
    # The main resource ignores status; the status subresource ignores spec.
    custom.patch_namespaced_custom_object(GROUP, "v1", widgets, "widgets", "w1", {"status": {"phase": "Lost"}})
    custom.patch_namespaced_custom_object_status(
        GROUP, "v1", widgets, "widgets", "w1", {"status": {"phase": "Ready"}, "spec": {"size": 9}}
    )
    widget = custom.get_namespaced_custom_object(GROUP, "v1", widgets, "widgets", "w1")
    assert widget["spec"]["size"] == 5
    assert widget["status"] == {"phase": "Ready"}
    assert widget["metadata"]["generation"] == 2


def test_schema_and_cel_violations_are_rejected(client: Any, widgets: str) -> None:
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    custom = k8s.CustomObjectsApi(client)
    body = {"apiVersion": f"{GROUP}/v1", "kind": "Widget", "metadata": {"name": "bad"}, "spec": {"size": 0}}
    with pytest.raises(ApiException) as caught:
        custom.create_namespaced_custom_object(GROUP, "v1", widgets, "widgets", body)
    assert caught.value.status == 422
    assert "spec.size" in json.loads(caught.value.body)["message"]

    body["spec"] = {"size": 11, "color": "blue"}
    with pytest.raises(ApiException) as caught:
        custom.create_namespaced_custom_object(GROUP, "v1", widgets, "widgets", body)
    assert caught.value.status == 422
    assert "blue widgets are small" in json.loads(caught.value.body)["message"]


def test_openapi_v2_publishes_the_crd_schema(kube_api: ApiServer, client: Any, widgets: str) -> None:
    definition = "dev.nso.example.v1.Widget"  # the group reversed, then version and kind
    deadline = time.monotonic() + 30
    while True:
        definitions = json.loads(get(client, kube_api, "/openapi/v2"))["definitions"]
        if definition in definitions or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    spec = definitions[definition]["properties"]["spec"]
    assert spec["description"] == "What the widget should be."
    assert spec["properties"]["size"]["minimum"] == 1


def test_kubectl_works_against_it(kubectl, widgets: str) -> None:
    assert "widgets" in kubectl("api-resources", "--api-group", GROUP).stdout
    assert "How big." in kubectl("explain", "widget.spec.size").stdout
    manifest = yaml.safe_dump({"apiVersion": f"{GROUP}/v1", "kind": "Widget",
                               "metadata": {"name": "from-kubectl", "namespace": widgets}, "spec": {"size": 2}})
    applied = kubectl("apply", "-f", "-", input=manifest)
    assert applied.returncode == 0, applied.stderr
    assert "from-kubectl" in kubectl("get", "wd", "-n", widgets).stdout


# ----------------------------------------------------------------------------- Volcano


def test_volcano_crds_come_from_the_built_module(client: Any) -> None:
    from kubernetes import client as k8s

    names = {yaml.safe_load(path.read_text())["metadata"]["name"] for path in volcano_crd_dir().glob("*.yaml")}
    assert {"jobs.batch.volcano.sh", "podgroups.scheduling.volcano.sh", "queues.scheduling.volcano.sh"} <= names
    served = {crd.metadata.name for crd in k8s.ApiextensionsV1Api(client).list_custom_resource_definition().items}
    assert names <= served


def test_volcano_job_applied_with_kubectl_gets_pods_from_volcano(client: Any, kubectl) -> None:
    namespace = fresh_namespace(client)
    h = Harness(client)
    applied = kubectl("apply", "-n", namespace, "-f", "-", input=VOLCANO_JOB.replace("NAME", "by-hand"))
    assert applied.returncode == 0, applied.stderr

    # Volcano's controller made the pods (a PodGroup, a pod per replica), its scheduler bound them
    # to the fast kubelet's nodes, the kubelet started them, and the controller says Running.
    h.set_phase(namespace, "by-hand", "Running")
    pods = h.running_pods(namespace, "by-hand")
    assert sorted(p["metadata"]["name"] for p in pods) == ["by-hand-worker-0", "by-hand-worker-1"]
    for pod in pods:
        assert pod["spec"]["schedulerName"] == "volcano" and pod["spec"]["nodeName"].startswith("nso-dev-node-")
        owner = pod["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"]) == ("Job", "by-hand")
    def podgroup_phases() -> list[str]:
        got = json.loads(kubectl("get", "podgroups.scheduling.volcano.sh", "-n", namespace, "-o", "json").stdout)
        return [g.get("status", {}).get("phase") for g in got["items"]]

    wait_for(lambda: podgroup_phases() == ["Running"], 60, "the job's one PodGroup Running",
             detail=lambda: str(podgroup_phases()))
    # The svc plugin: a headless Service whose name the pods' host names resolve under.
    services = kubectl("get", "services", "-n", namespace, "-o", "name").stdout.split()
    assert services == ["service/by-hand"]

    # The containers exit with 0: Volcano's job controller derives Completed from the pods.
    h.set_phase(namespace, "by-hand", "Completed")
    job = json.loads(kubectl("get", "vcjob", "by-hand", "-n", namespace, "-o", "json").stdout)
    assert job["status"]["state"]["phase"] == "Completed"
    assert [c["status"] for c in job["status"]["conditions"]][-1:] == ["Completed"]
    assert {p["status"]["phase"] for p in h.pods(namespace, "by-hand")} == {"Succeeded"}


def test_a_failing_pod_fails_the_volcano_job(client: Any, kubectl) -> None:
    namespace = fresh_namespace(client)
    h = Harness(client)
    assert kubectl("apply", "-n", namespace, "-f", "-", input=VOLCANO_JOB.replace("NAME", "failing")).returncode == 0
    h.set_phase(namespace, "failing", "Failed")
    pods = h.pods(namespace, "failing")
    terminated = [s["state"]["terminated"] for p in pods for s in p["status"]["containerStatuses"]]
    assert {t["exitCode"] for t in terminated} == {1}
    assert job_phase(h.job(namespace, "failing")) == "Failed"


def test_volcano_webhook_rejects_an_invalid_job(client: Any) -> None:
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    namespace = fresh_namespace(client)
    job = yaml.safe_load(VOLCANO_JOB.replace("NAME", "too-few"))
    job["spec"]["minAvailable"] = 5  # more than its two replicas: Volcano's validating webhook says no
    with pytest.raises(ApiException) as caught:
        k8s.CustomObjectsApi(client).create_namespaced_custom_object(
            "batch.volcano.sh", "v1alpha1", namespace, "jobs", job)
    assert "admission webhook" in caught.value.body and "validatejob.volcano.sh" in caught.value.body
    assert "minAvailable" in caught.value.body


def test_the_default_queue_is_open(kubectl) -> None:
    queue = json.loads(kubectl("get", "queues.scheduling.volcano.sh", "default", "-o", "json").stdout)
    assert queue["status"]["state"] == "Open"


# ----------------------------------------------------------------------------- admission and RBAC


def test_rbac_is_enforced_and_answers_can_i(client: Any, kubectl) -> None:
    namespace = fresh_namespace(client)
    account = f"system:serviceaccount:{namespace}:default"

    def can_i(verb: str, resource: str) -> str:
        return kubectl("auth", "can-i", verb, resource, "-n", namespace, "--as", account).stdout.strip()

    assert can_i("create", "pods") == "no"  # an unbound ServiceAccount
    assert kubectl("auth", "can-i", "create", "pods", "-n", namespace).stdout.strip() == "yes"  # the admin
    bound = kubectl("create", "rolebinding", "edit", "-n", namespace, "--clusterrole", "edit",
                    "--serviceaccount", f"{namespace}:default")
    assert bound.returncode == 0, bound.stderr
    assert wait_for(lambda: can_i("create", "pods") == "yes", 30, "the binding to take effect")
    assert can_i("create", "roles") == "no"  # `edit` grants no RBAC objects
    denied = kubectl("get", "secrets", "-n", "kube-system", "--as", account)
    assert denied.returncode != 0 and "Forbidden" in denied.stderr


def test_pod_security_admission_rejects_a_privileged_pod_in_a_restricted_namespace(client: Any) -> None:
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    namespace = fresh_namespace(client, {"pod-security.kubernetes.io/enforce": "restricted"})
    pod = {"metadata": {"name": "privileged"}, "spec": {"containers": [
        {"name": "main", "image": "busybox", "securityContext": {"privileged": True}}]}}
    with pytest.raises(ApiException) as caught:
        k8s.CoreV1Api(client).create_namespaced_pod(namespace, pod)
    message = json.loads(caught.value.body)["message"]
    assert caught.value.status == 403 and 'violates PodSecurity "restricted' in message and "privileged" in message


def test_owner_references_permission_enforcement(client: Any, kubectl) -> None:
    """Setting blockOwnerDeletion needs `update` on the owner's finalizers, which `edit` does not grant."""
    namespace = fresh_namespace(client)
    assert kubectl("create", "rolebinding", "edit", "-n", namespace, "--clusterrole", "edit",
                   "--serviceaccount", f"{namespace}:default").returncode == 0
    owner = kubectl("create", "configmap", "owner", "-n", namespace, "-o", "json")
    uid = json.loads(owner.stdout)["metadata"]["uid"]

    def dependent(block: bool) -> str:
        return yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
            "name": f"dependent-{str(block).lower()}", "namespace": namespace,
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid,
                                 "blockOwnerDeletion": block}]}})

    account = f"system:serviceaccount:{namespace}:default"
    wait_for(lambda: kubectl("auth", "can-i", "create", "configmaps", "-n", namespace, "--as", account)
             .stdout.strip() == "yes", 30, "the binding to take effect")
    allowed = kubectl("create", "-f", "-", "--as", account, input=dependent(False))
    assert allowed.returncode == 0, allowed.stderr
    refused = kubectl("create", "-f", "-", "--as", account, input=dependent(True))
    assert refused.returncode != 0 and "cannot set blockOwnerDeletion" in refused.stderr


# ----------------------------------------------------------------------------- the script


def test_up_is_idempotent_and_down_stops_every_process(tmp_path: Path) -> None:
    try:
        server = start_api_server(tmp_path)
    except ApiServerUnavailable as error:
        skip_or_fail(f"no Kubernetes control plane for tests: {error}")
    env = {**os.environ, "NSO_DEV_CLUSTER_DIR": str(server.run_dir)}

    def dev_cluster(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(DEV_CLUSTER), *args], env=env, capture_output=True, text=True, timeout=120)

    names = ["etcd", "apiserver", "controller-manager", "vc-webhook", "vc-scheduler", "vc-controllers", "kubelet"]
    pids = [(server.run_dir / f"{name}.pid").read_text().strip() for name in names]
    assert all(Path(f"/proc/{pid}").exists() for pid in pids)
    assert dev_cluster("up").stdout.strip() == str(server.kubeconfig)
    assert [(server.run_dir / f"{name}.pid").read_text().strip() for name in names] == pids
    assert dev_cluster("status").returncode == 0
    assert dev_cluster("kubeconfig").stdout.strip() == str(server.kubeconfig)
    server.stop()
    assert dev_cluster("status").returncode == 3
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)
