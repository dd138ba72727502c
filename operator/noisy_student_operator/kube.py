"""The operator's narrow seam to the Kubernetes API for NoisyStudentRun objects."""

from __future__ import annotations

from typing import Any

from .api import GROUP, PLURAL, VERSION


def load_kube_config() -> None:
    """In-cluster configuration when running in a pod, else the kubeconfig."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


class Conflict(Exception):
    """The run changed since it was read (HTTP 409 on a write with its resourceVersion)."""


class RunsApi:
    """Get NoisyStudentRuns and patch their status subresource."""

    def __init__(self, api_client: Any = None) -> None:
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client)

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        try:
            return self.api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def patch_status(
        self, namespace: str, name: str, status: dict[str, Any], resource_version: str | None = None
    ) -> None:
        """Merge-patch the status; with `resource_version`, only if the run is unchanged since (else Conflict)."""
        from kubernetes.client.rest import ApiException

        body: dict[str, Any] = {"status": status}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        try:
            self.api.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, body)
        except ApiException as error:
            if error.status == 409:
                raise Conflict(f"{namespace}/{name} changed since it was read") from error
            raise
