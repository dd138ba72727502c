"""Status writes against the real API server while another writer changes the run.

The operator's status writes carry the resourceVersion it read; here a second
writer (another controller, `kubectl label`) changes the run between every
read and write of the first passes, so the server answers 409 Conflict. A
label is outside what a pass reads: its status is written again against a
fresh read (not planned again, which would ask for its job once more), and
the other writer's change is kept.
"""

from __future__ import annotations

import uuid

import pytest
from kube_server import ensure_namespace
from operator_harness import api_client, apply_crds, run_crd, wait_for

from noisy_student_operator.backend import InMemoryJobBackend
from noisy_student_operator.controller import RunController
from noisy_student_operator.kube import Conflict, RunsApi
from noisy_student_operator.reconcile import MarkerReader, Reconciler

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "noisystudent.dev", "v1alpha1", "noisystudentruns"


class RacingRunsApi(RunsApi):
    """The real runs API; after each of the first `races` reads, another writer labels the run."""

    def __init__(self, client, races):
        super().__init__(client)
        self.races = races
        self.conflicts = 0

    def get(self, namespace, name, cached=False):
        body = super().get(namespace, name, cached)
        if body is not None and self.races:
            self.races -= 1
            self.api.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, {"metadata": {"labels": {"other-writer": str(self.races)}}})
        return body

    def patch_status(self, namespace, name, status, resource_version=None):
        try:
            super().patch_status(namespace, name, status, resource_version)
        except Conflict:
            self.conflicts += 1
            raise


def fresh_namespace(kube_api):
    """An API client of the test server with the run CRD applied, and a new namespace."""
    client = api_client(kube_api.kubeconfig)
    apply_crds(client, [run_crd()])
    namespace = f"t-{uuid.uuid4().hex[:8]}"
    ensure_namespace(client, namespace)
    return client, namespace


def create_demo_run(runs, namespace, s3_prefix):
    runs.api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "NoisyStudentRun", "metadata": {"name": "demo"},
        "spec": {"data": {"labeled": "s3://d/l.tar", "unlabeled": "s3://d/u.tar", "validation": "s3://d/v.tar",
                          "numClasses": 10},
                 "artifacts": {"uri": s3_prefix}, "teacher": {"model": "resnet18"},
                 "students": [{"model": "resnet18"}]}})


def test_a_status_write_that_meets_another_writers_label_is_written_again_and_keeps_its_change(kube_api, s3_prefix):
    client, namespace = fresh_namespace(kube_api)
    runs = RacingRunsApi(client, races=2)
    create_demo_run(runs, namespace, s3_prefix)
    backend = InMemoryJobBackend()
    controller = RunController(runs, {"kubernetes": backend}, reconciler_for=lambda b: Reconciler(b, MarkerReader()))
    assert controller.reconcile(namespace, "demo") is not None
    assert runs.conflicts == 2  # the server refused the first two writes (409)
    body = runs.api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "demo")
    assert body["metadata"]["labels"]["other-writer"] == "0"  # the other writer's last change is kept
    assert [j["state"] for j in body["status"]["jobs"]] == ["Pending"]
    assert len(backend.jobs) == 1 and backend.submissions == list(backend.jobs)  # asked for once
    assert body["status"]["observedGeneration"] == body["metadata"]["generation"]


def test_a_cached_read_of_a_run_is_the_run_and_none_once_it_is_gone(kube_api, s3_prefix):
    """`RunsApi.get(cached=True)` (resourceVersion 0: the API server's watch cache, what hinted
    passes read) returns what a read from etcd returns, and None for a run that does not exist."""
    client, namespace = fresh_namespace(kube_api)
    runs = RunsApi(client)
    assert runs.get(namespace, "demo", cached=True) is None
    create_demo_run(runs, namespace, s3_prefix)
    fresh = runs.get(namespace, "demo")
    assert runs.get(namespace, "demo", cached=True)["metadata"]["uid"] == fresh["metadata"]["uid"]
    runs.api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "demo")
    wait_for(lambda: runs.get(namespace, "demo", cached=True) is None, 10, "the cache to see the deletion")
