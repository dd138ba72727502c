"""The chart's RBAC against admission on a real control plane (scripts/dev-cluster).

The dev cluster's API server runs `OwnerReferencesPermissionEnforcement`, as
OpenShift and hardened clusters do: creating an object whose ownerReference
sets `blockOwnerDeletion` needs `update` on the owner's `finalizers`
subresource, a permission that admission checks without any request for it
appearing in the audit log. A user bound to exactly the chart's operator
rules (`templates/_rbac.tpl`) creates a Volcano Job owned by a run as the
operator does (server-side dry run: all admission runs, nothing is stored).
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_server import ApiServer, ensure_namespace
from operator_harness import RUNS, apply_crds, run_crd, run_document

pytestmark = pytest.mark.integration

RBAC_TEMPLATE = Path(__file__).resolve().parents[2] / "charts" / "noisy-student-operator" / "templates" / "_rbac.tpl"
FINALIZERS = "noisystudentruns/finalizers"


def chart_rules(name: str) -> list[dict[str, Any]]:
    """The rules of one `define` of _rbac.tpl (plain YAML inside)."""
    text = RBAC_TEMPLATE.read_text()
    body = re.search(r'define "noisy-student-operator\.rbac\.' + name + r'" -}}\n(.*?)\{\{- end }}', text, re.S)
    assert body, f"no {name} in {RBAC_TEMPLATE}"
    return yaml.safe_load(body.group(1))


def without_finalizers(rules: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rules if FINALIZERS not in r["resources"]]


@pytest.fixture(scope="module")
def admin(kube_api: ApiServer) -> Any:
    client = kube_api.api_client()
    apply_crds(client, [run_crd()])
    return client


def as_user(kube_api: ApiServer, user: str) -> Any:
    client = kube_api.api_client()
    client.set_default_header("Impersonate-User", user)
    return client


def bind(admin: Any, namespace: str, user: str, rules: list[dict[str, Any]]) -> None:
    from kubernetes import client as k8s

    rbac = k8s.RbacAuthorizationV1Api(admin)
    rbac.create_namespaced_role(namespace, {"metadata": {"name": user}, "rules": rules})
    rbac.create_namespaced_role_binding(namespace, {
        "metadata": {"name": user},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": user},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
    })


def owned_job(run: dict[str, Any]) -> dict[str, Any]:
    """A Volcano Job owned by `run` the way the operator owns its jobs (backend.patch_volcano_job)."""
    meta = run["metadata"]
    return {
        "apiVersion": "batch.volcano.sh/v1alpha1", "kind": "Job",
        "metadata": {"name": "owned", "ownerReferences": [{
            "apiVersion": run["apiVersion"], "kind": run["kind"], "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}]},
        "spec": {"schedulerName": "volcano", "queue": "default", "minAvailable": 1, "tasks": [{
            "name": "main", "replicas": 1,
            "template": {"spec": {"restartPolicy": "Never", "containers": [
                {"name": "main", "image": "busybox", "command": ["true"]}]}}}]},
    }


@pytest.mark.parametrize("with_finalizers", [True, False], ids=["chart-rules", "without-finalizers-update"])
def test_operator_rules_create_owned_jobs_under_owner_reference_enforcement(kube_api, admin, with_finalizers):
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    namespace = f"t-{uuid.uuid4().hex[:8]}"
    ensure_namespace(admin, namespace)
    try:
        user = f"nso-rbac-{uuid.uuid4().hex[:6]}"
        rules = chart_rules("namespacedRules")
        bind(admin, namespace, user, rules if with_finalizers else without_finalizers(rules))
        spec = {"data": {"numClasses": 10, "prepare": {"source": "digits", "labelsPerClass": 10}},
                "artifacts": {"uri": "s3://bucket/runs/"}, "teacher": {"model": "resnet18"},
                "students": [{"model": "resnet18"}]}
        run = k8s.CustomObjectsApi(admin).create_namespaced_custom_object(
            **RUNS, namespace=namespace, body=run_document("owner", spec))
        create = lambda: k8s.CustomObjectsApi(as_user(kube_api, user)).create_namespaced_custom_object(  # noqa: E731
            "batch.volcano.sh", "v1alpha1", namespace, "jobs", owned_job(run), dry_run="All")
        if with_finalizers:
            assert create()["metadata"]["ownerReferences"][0]["blockOwnerDeletion"] is True
        else:
            with pytest.raises(ApiException) as error:
                create()
            assert error.value.status == 403 and "blockOwnerDeletion" in error.value.body, error.value.body
    finally:
        k8s.CoreV1Api(admin).delete_namespace(namespace)
