"""A real Kubernetes control plane for tests via ``scripts/dev-cluster``.

Each call of `start_api_server` starts a private cluster (etcd,
kube-apiserver, kube-controller-manager, Volcano's scheduler, controllers and
webhooks, nodes run by the fast test kubelet; own certificates, loopback ports)
with its state under the given directory; the binaries are built once and
cached by the script (see ``scripts/dev-cluster help``).

Run by hand::

    python tests/kube_server.py   # prints the kubeconfig path until Ctrl-C
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]
DEV_CLUSTER = REPO_ROOT / "scripts" / "dev-cluster"
#: The first build downloads the modules and compiles for 20 to 40 minutes on 2 busy cores.
BUILD_TIMEOUT = 3600.0
START_TIMEOUT = 300.0

T = TypeVar("T")


class ApiServerUnavailable(RuntimeError):
    """The cluster's binaries could not be built (or etcd is missing): tests may skip."""


@dataclass
class ApiServer:
    """A running private cluster; `stop()` ends it (its state directory stays)."""

    kubeconfig: Path
    url: str
    run_dir: Path
    #: Where the server writes its audit log, when started with ``--audit-log-path=...``.
    audit_log: Path | None = None

    @property
    def kubeconfig_path(self) -> Path:
        return self.kubeconfig

    def stop(self) -> None:
        _dev_cluster(["down"], self.run_dir, timeout=60)

    def api_client(self) -> Any:
        """A fresh `kubernetes.client.ApiClient` for this server."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))


def _dev_cluster(
    args: Sequence[str], run_dir: Path | None, timeout: float, kubelet: str | None = None
) -> subprocess.CompletedProcess[str]:
    # The server goes down with this process even when it is killed.
    env = {**os.environ, "NSO_DEV_CLUSTER_OWNER_PID": str(os.getpid())}
    if kubelet is not None:
        env["NSO_DEV_KUBELET"] = kubelet
    if run_dir is not None:
        env["NSO_DEV_CLUSTER_DIR"] = str(run_dir)
    return subprocess.run(
        [str(DEV_CLUSTER), *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def build_api_server() -> Path:
    """Build the cluster's binaries if they are not cached; return their directory.

    Raises `ApiServerUnavailable` when that fails."""
    try:
        done = _dev_cluster(["build"], None, timeout=BUILD_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ApiServerUnavailable(f"scripts/dev-cluster build: {error}") from error
    if done.returncode != 0:
        raise ApiServerUnavailable(f"scripts/dev-cluster build failed:\n{_tail(done.stderr)}")
    return Path(done.stdout.strip().splitlines()[-1])


def volcano_crd_dir() -> Path:
    """Volcano's CRDs, from the Volcano module the cluster's binaries were built from."""
    return build_api_server() / "volcano-crds"


def start_api_server(tmp_path: Path, extra_args: Sequence[str] = (), kubelet: str = "fast") -> ApiServer:
    """Start a private cluster with its state under ``tmp_path/dev-cluster``.

    ``extra_args`` go to kube-apiserver (e.g. audit log flags); ``kubelet`` is
    the test kubelet's mode (``fast``, or ``podman`` to run real containers).
    Raises `ApiServerUnavailable` when the binaries cannot be built or etcd is
    missing, and `RuntimeError` when a built cluster fails to start.
    """
    build_api_server()
    run_dir = Path(tmp_path) / "dev-cluster"
    done = _dev_cluster(["up", "--", *extra_args], run_dir, timeout=START_TIMEOUT, kubelet=kubelet)
    if done.returncode != 0:
        message = f"scripts/dev-cluster up failed:\n{_tail(done.stderr)}"
        if "etcd is not installed" in done.stderr:
            raise ApiServerUnavailable(message)
        raise RuntimeError(message)
    audit_logs = [arg.split("=", 1)[1] for arg in extra_args if arg.startswith("--audit-log-path=")]
    return ApiServer(
        kubeconfig=Path(done.stdout.strip().splitlines()[-1]),
        url=(run_dir / "url").read_text().strip(),
        run_dir=run_dir,
        audit_log=Path(audit_logs[-1]) if audit_logs else None,
    )


@contextmanager
def api_server(tmp_path: Path, extra_args: Sequence[str] = ()) -> Iterator[ApiServer]:
    """`start_api_server` as a context manager that stops the server on exit."""
    server = start_api_server(tmp_path, extra_args)
    try:
        yield server
    finally:
        server.stop()


def retry_while_initialising(call: Callable[[], T], timeout: float = 30.0) -> T:
    """``call()``, retried while a new CRD's storage initialises (429, 503) or is not routed yet (404)."""
    from kubernetes.client.rest import ApiException

    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except ApiException as error:
            if error.status not in (404, 429, 503) or time.monotonic() > deadline:
                raise
            time.sleep(0.3)


def wait_for_crd_established(api_client: Any, name: str, timeout: float = 30.0) -> None:
    """Wait until the CRD ``name`` is Established and its resource answers a list."""
    from kubernetes import client as k8s

    extensions = k8s.ApiextensionsV1Api(api_client)
    deadline = time.monotonic() + timeout
    while True:
        crd = extensions.read_custom_resource_definition(name)
        conditions = (crd.status.conditions or []) if crd.status else []
        if any(c.type == "Established" and c.status == "True" for c in conditions):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"CRD {name} not Established after {timeout} s: {conditions}")
        time.sleep(0.1)
    version = next(v.name for v in crd.spec.versions if v.served)
    custom = k8s.CustomObjectsApi(api_client)
    retry_while_initialising(
        lambda: custom.list_cluster_custom_object(crd.spec.group, version, crd.spec.names.plural, limit=1),
        max(deadline - time.monotonic(), 5.0),
    )


def apply_crd(api_client: Any, manifest: dict[str, Any], timeout: float = 30.0) -> None:
    """Create or replace a CRD from its manifest and wait until it is usable."""
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    extensions = k8s.ApiextensionsV1Api(api_client)
    name = manifest["metadata"]["name"]
    try:
        extensions.create_custom_resource_definition(manifest)
    except ApiException as error:
        if error.status != 409:
            raise
        current = extensions.read_custom_resource_definition(name)
        metadata = {**manifest["metadata"], "resourceVersion": current.metadata.resource_version}
        extensions.replace_custom_resource_definition(name, {**manifest, "metadata": metadata})
    wait_for_crd_established(api_client, name, timeout)


def project_image(role: str) -> str:
    """The project's image of `role` (``scripts/images tags``: base, operator, workloads), made or refreshed first.

    ``scripts/images base`` for the base, else ``scripts/images build`` (a no-op
    when nothing changed). Skips, or fails under CI=true, without podman as root."""
    from conftest import skip_or_fail

    if shutil.which("podman") is None or os.geteuid() != 0:
        skip_or_fail("the project's images and the podman kubelet need podman as root")
    script = REPO_ROOT / "scripts" / "images"
    made = subprocess.run([script, "base" if role == "base" else "build"], capture_output=True, text=True,
                          timeout=3600)
    assert made.returncode == 0, made.stderr[-3000:]
    tags = subprocess.run([script, "tags"], capture_output=True, text=True, check=True, timeout=60).stdout
    return dict(line.split(" ", 1) for line in tags.splitlines())[role]


@contextmanager
def podman_cluster(tmp_path: Path) -> Iterator[ApiServer]:
    """A private cluster whose kubelet runs pods as podman containers; skips (fails under CI) when unavailable."""
    from conftest import skip_or_fail

    try:
        server = start_api_server(tmp_path, kubelet="podman")
    except ApiServerUnavailable as error:
        skip_or_fail(f"no Kubernetes control plane for tests: {error}")
    try:
        yield server
    finally:
        server.stop()


def container_logs(server: ApiServer, namespace: str) -> str:
    """The logs the podman kubelet kept of every container of the namespace's pods (for failure messages)."""
    parts = []
    for path in sorted((server.run_dir / "kubelet" / "logs").glob(f"{namespace}_*/*/*.log")):
        lines = [line.split(" ", 3)[-1] for line in path.read_text(errors="replace").splitlines()]
        pod = path.parent.parent.name.split("_")[1]  # <namespace>_<pod>_<uid>: DNS names have no "_"
        parts.append(f"--- {pod}/{path.parent.name} ({path.name})\n" + "\n".join(lines))
    return "\n".join(parts) or f"(no container logs of namespace {namespace})"


def kubectl_runner(server: ApiServer) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run(*args, input=None)``: kubectl against the server (check=False); skips (fails under CI) without kubectl."""
    from conftest import skip_or_fail

    binary = find_kubectl()
    if binary is None:
        skip_or_fail("no kubectl (not on PATH, and scripts/get-kube-tools could not fetch one)")
    env = {**os.environ, "KUBECONFIG": str(server.kubeconfig)}

    def run(*args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(binary), *args], env=env, input=input, capture_output=True, text=True, timeout=120)

    return run


def fresh_namespace(api_client: Any, labels: dict[str, str] | None = None) -> str:
    """A new namespace with a unique name, its ``default`` ServiceAccount ready."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    ensure_namespace(api_client, name, labels)
    return name


def find_kubectl() -> str | None:
    """kubectl on PATH, else the one scripts/get-kube-tools fetches (None when neither works)."""
    found = shutil.which("kubectl")
    if found:
        return found
    try:
        done = subprocess.run([str(REPO_ROOT / "scripts" / "get-kube-tools"), "--bin-dir", "v35"],
                              capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    candidate = Path(lines[-1]) / "kubectl" if done.returncode == 0 and lines else None
    return str(candidate) if candidate and candidate.exists() else None


def ensure_namespace(
    api_client: Any, name: str, labels: dict[str, str] | None = None, timeout: float = 60.0
) -> None:
    """Create the namespace unless it exists; wait for its ``default`` ServiceAccount, which pods need."""
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    core = k8s.CoreV1Api(api_client)
    try:
        core.create_namespace({"metadata": {"name": name, "labels": labels or {}}})
    except ApiException as error:
        if error.status != 409:
            raise
    deadline = time.monotonic() + timeout
    while True:
        try:
            core.read_namespaced_service_account("default", name)
            return
        except ApiException as error:
            if error.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="kube-api-") as directory, api_server(Path(directory)) as server:
        print(f"Kubernetes control plane at {server.url}\nexport KUBECONFIG={server.kubeconfig}\n(Ctrl-C stops it)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
