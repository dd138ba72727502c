"""The operator's narrow seam to the Kubernetes API for NoisyStudentRun objects."""

from __future__ import annotations

from typing import Any

from .api import GROUP, PLURAL, VERSION


#: The client configuration `load_kube_config` made; `new_api_client` builds on it.
_configuration: Any = None


def load_kube_config(connections: int | None = None) -> None:
    """In-cluster configuration when running in a pod, else the kubeconfig; `connections`: how
    many connections to the API server the clients keep open (urllib3's default, 10, makes
    more concurrent passes open and drop a connection each)."""
    global _configuration
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = client.Configuration.get_default_copy()
    if connections is not None:
        configuration.connection_pool_maxsize = connections
        client.Configuration.set_default(configuration)
    _configuration = configuration


def new_api_client() -> Any:
    """An API client of the configuration `load_kube_config` made (else the default one). Not
    the default configuration itself: kopf's login loads the kubeconfig into it again, with 10
    connections, after the operator configured its clients."""
    from kubernetes import client

    return client.ApiClient(_configuration)


def get_custom_object(
    objects: Any, group: str, version: str, namespace: str, plural: str, name: str, cached: bool = False
) -> dict[str, Any] | None:
    """One namespaced custom object through a `CustomObjectsApi`, or None when it does not exist.

    `cached`: from the API server's watch cache (resourceVersion 0: as fresh as the watch
    streams, no etcd read; under a thousand runs' writes an etcd read took longer than a write),
    for readers that tolerate a read a moment old; an object the cache does not have yet is
    read from etcd."""
    from kubernetes.client.rest import ApiException

    if cached:
        try:
            return objects.api_client.call_api(
                "/apis/{group}/{version}/namespaces/{namespace}/{plural}/{name}", "GET",
                path_params={"group": group, "version": version, "namespace": namespace, "plural": plural,
                             "name": name},
                query_params=[("resourceVersion", "0")], header_params={"Accept": "application/json"},
                response_types_map={200: "object"}, auth_settings=["BearerToken"], _return_http_data_only=True)
        except ApiException as error:
            if error.status != 404:
                raise
    try:
        return objects.get_namespaced_custom_object(group, version, namespace, plural, name)
    except ApiException as error:
        if error.status == 404:
            return None
        raise


class Conflict(Exception):
    """The run changed since it was read (HTTP 409 on a write with its resourceVersion)."""


class RunsApi:
    """Get NoisyStudentRuns and patch their status subresource."""

    def __init__(self, api_client: Any = None) -> None:
        from kubernetes import client

        self.api = client.CustomObjectsApi(api_client or new_api_client())

    def get(self, namespace: str, name: str, cached: bool = False) -> dict[str, Any] | None:
        """The run, or None; `cached`: see `get_custom_object` (a pass whose status write is
        conditional anyway)."""
        return get_custom_object(self.api, GROUP, VERSION, namespace, PLURAL, name, cached)

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
