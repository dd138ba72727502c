"""The test API server itself (scripts/dev-cluster): what the operator, kopf and kubectl rely on.

Discovery (/api, /api/v1, /apis) through the Kubernetes Python client, CRDs
with schema validation and the status subresource, the OpenAPI v2 document,
namespaces and events, and Volcano's CRDs with a minimal Volcano Job.
"""

from __future__ import annotations

import json
import os
import shutil
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
    REPO_ROOT,
    ApiServer,
    ApiServerUnavailable,
    apply_crd,
    retry_while_initialising,
    start_api_server,
)

pytestmark = pytest.mark.integration

VOLCANO_CRD_DIR = REPO_ROOT.parent / "shared" / "crds" / "volcano"

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


@pytest.fixture(scope="module")
def client(kube_api: ApiServer) -> Any:
    return kube_api.api_client()


@pytest.fixture(scope="module")
def widgets(client: Any) -> str:
    """The Widget CRD applied and usable; yields a fresh namespace name."""
    apply_crd(client, WIDGET_CRD)
    return f"t-{uuid.uuid4().hex[:8]}"


def get(client: Any, server: ApiServer, path: str) -> bytes:
    return client.rest_client.GET(server.url + path).data


def test_readyz_and_version(kube_api: ApiServer, client: Any) -> None:
    from kubernetes import client as k8s

    assert get(client, kube_api, "/readyz") == b"ok"
    assert k8s.VersionApi(client).get_code().git_version.startswith("v1.")


def test_core_discovery_and_namespaces(client: Any) -> None:
    from kubernetes import client as k8s

    assert k8s.CoreApi(client).get_api_versions().versions == ["v1"]
    resources = {r.name: r for r in k8s.CoreV1Api(client).get_api_resources().resources}
    assert not resources["namespaces"].namespaced and resources["events"].namespaced
    core = k8s.CoreV1Api(client)
    assert "default" in [n.metadata.name for n in core.list_namespace().items]
    assert core.read_namespace("any-name").status.phase == "Active"


def test_events_are_accepted_and_listed(client: Any) -> None:
    from kubernetes import client as k8s

    core = k8s.CoreV1Api(client)
    namespace = f"t-{uuid.uuid4().hex[:8]}"
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
    assert "apiextensions.k8s.io" in groups
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


def test_kubectl_works_against_it(kube_api: ApiServer, widgets: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not on PATH (scripts/get-kube-tools fetches one)")
    env = {**os.environ, "KUBECONFIG": str(kube_api.kubeconfig)}

    def run(*args: str) -> str:
        return subprocess.run([kubectl, *args], env=env, capture_output=True, text=True, check=True).stdout

    assert "widgets" in run("api-resources", "--api-group", GROUP)
    assert "How big." in run("explain", "widget.spec.size")
    manifest = yaml.safe_dump({"apiVersion": f"{GROUP}/v1", "kind": "Widget",
                               "metadata": {"name": "from-kubectl", "namespace": widgets}, "spec": {"size": 2}})
    subprocess.run([kubectl, "apply", "-f", "-"], input=manifest, env=env, text=True, check=True, capture_output=True)
    assert "from-kubectl" in run("get", "wd", "-n", widgets)


def test_up_is_idempotent_and_down_stops_both_processes(tmp_path: Path) -> None:
    try:
        server = start_api_server(tmp_path)
    except ApiServerUnavailable as error:
        skip_or_fail(f"no Kubernetes API server for tests: {error}")
    env = {**os.environ, "NSO_DEV_CLUSTER_DIR": str(server.run_dir)}

    def dev_cluster(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(DEV_CLUSTER), *args], env=env, capture_output=True, text=True, timeout=120)

    pids = [(server.run_dir / f"{name}.pid").read_text().strip() for name in ("etcd", "apiserver")]
    assert dev_cluster("up").stdout.strip() == str(server.kubeconfig)
    assert [(server.run_dir / f"{name}.pid").read_text().strip() for name in ("etcd", "apiserver")] == pids
    assert dev_cluster("status").returncode == 0
    server.stop()
    assert dev_cluster("status").returncode == 3
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)


def volcano_crds() -> list[dict[str, Any]]:
    paths = sorted(VOLCANO_CRD_DIR.glob("*.yaml"))
    if not paths:
        skip_or_fail(f"Volcano CRDs not found in {VOLCANO_CRD_DIR}")
    return [d for path in paths for d in yaml.safe_load_all(path.read_text()) if d]


def test_volcano_crds_install_and_validate_a_job(client: Any) -> None:
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    for crd in volcano_crds():
        apply_crd(client, crd, timeout=60)
    custom = k8s.CustomObjectsApi(client)
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    job = {
        "apiVersion": "batch.volcano.sh/v1alpha1",
        "kind": "Job",
        "metadata": {"name": "minimal"},
        "spec": {
            "schedulerName": "volcano",
            "queue": "default",
            "minAvailable": 1,
            "tasks": [{
                "name": "worker",
                "replicas": 1,
                "template": {"spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": "busybox", "command": ["true"]}],
                }},
            }],
        },
    }
    created = retry_while_initialising(
        lambda: custom.create_namespaced_custom_object("batch.volcano.sh", "v1alpha1", namespace, "jobs", job)
    )
    assert created["spec"]["tasks"][0]["name"] == "worker"

    job["metadata"]["name"] = "invalid"
    job["spec"]["minAvailable"] = "one"
    with pytest.raises(ApiException) as caught:
        custom.create_namespaced_custom_object("batch.volcano.sh", "v1alpha1", namespace, "jobs", job)
    assert caught.value.status == 422
    assert "spec.minAvailable" in json.loads(caught.value.body)["message"]
