"""Drive the real operator against a real control plane: play the workloads.

The operator (`noisy-student operator`) runs as a subprocess with its own
kubeconfig and S3 credentials, exactly as in a cluster. Volcano is real
(scripts/dev-cluster): its controller makes pods of the operator's Jobs, its
scheduler binds them to the nodes of the fast test kubelet, which starts them
at once. No workload runs: `Harness` ends a job's pods as its containers
would (the kubelet's exit-code annotation), after writing the completion
markers (`_DONE.json`) the workloads would write, into the real S3 server, at
the paths the run layout defines; Volcano's job controller derives the Job's
phase from its pods.

RBAC coverage: the operator gets its own client certificate (user
`noisy-student-operator`, see `operator_kubeconfig`), the API server's audit
log records every request, and `operator_permissions` reduces the operator's
requests to (apiGroup, resource[/subresource], verb) triples. The integration
tests keep the union in `tests/fixtures/operator_permissions.json`;
`observed_operator_permissions()` reads it for other tests (the chart's RBAC).

Used by tests/integration/test_operator.py, tests/e2e/test_operator_quickstart.py
and bench/operator_scale.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kube_server import apply_crd, ensure_namespace, retry_while_initialising, volcano_crd_dir

from noisy_student_operator.api import GROUP, PLURAL, VERSION, RunSpec, validate_tolerant
from noisy_student_operator.backend import (
    LABEL_ATTEMPT,
    LABEL_GENERATION,
    LABEL_KEY,
    LABEL_RUN,
    LABEL_STAGE,
    MANAGED_BY,
)
from noisy_student_operator.core.layout import BALANCE, LABEL, PREPARE, RunLayout, Stage, job_name

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_CRD = REPO_ROOT / "crds" / "noisystudent.dev_noisystudentruns.yaml"
PERMISSIONS_FILE = Path(__file__).resolve().parent / "fixtures" / "operator_permissions.json"

HARNESS_AGENT = "nso-harness"
#: The operator's user name (CN of its client certificate) in the audit log.
OPERATOR_USER = "noisy-student-operator"

VOLCANO_JOBS = {"group": "batch.volcano.sh", "version": "v1alpha1", "plural": "jobs"}
#: The label Volcano's job controller puts on the pods of a Job.
VOLCANO_JOB_LABEL = "volcano.sh/job-name"
#: The fast kubelet ends a pod's containers with this exit code (scripts/dev-cluster.d/nso-dev/kubelet.go) ...
EXIT_CODE_ANNOTATION = "kubelet.nso.dev/exit-code"
#: ... and this termination message.
EXIT_MESSAGE_ANNOTATION = "kubelet.nso.dev/message"
RUNS = {"group": GROUP, "version": VERSION, "plural": PLURAL}
#: A finalizer the harness puts on pods to keep them Terminating (`Harness.hold_pods`).
HOLD_FINALIZER = "harness.nso.dev/hold"

# Only the operator's requests: the controllers' and the kubelet's would
# make the log large for nothing.
AUDIT_POLICY = f"""\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    users: [{OPERATOR_USER}]
  - level: None
"""

T = TypeVar("T")


# ----------------------------------------------------------------------------- waiting


def wait_for(
    probe: Callable[[], T], timeout: float, what: str, interval: float = 0.2, detail: Callable[[], str] | None = None
) -> T:
    """Poll `probe` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            extra = f"\n{detail()}" if detail else ""
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}{extra}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- API access


def api_client(kubeconfig: str | os.PathLike[str]) -> Any:
    """A Kubernetes `ApiClient` for the harness, with its own user agent."""
    from kubernetes import config

    client = config.new_client_from_config(config_file=str(kubeconfig))
    client.user_agent = HARNESS_AGENT
    return client


def load_documents(paths: Iterable[Path]) -> list[dict[str, Any]]:
    documents = []
    for path in paths:
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return documents


def apply_crds(client: Any, documents: list[dict[str, Any]], timeout: float = 60.0) -> None:
    """Create or replace CRDs and wait until each is Established and answers a list."""
    for crd in documents:
        apply_crd(client, crd, timeout)


def volcano_crds() -> list[dict[str, Any]]:
    """Volcano's CRDs, from the Volcano module that scripts/dev-cluster builds (its cluster has them)."""
    return load_documents(sorted(volcano_crd_dir().glob("*.yaml")))


def run_crd() -> dict[str, Any]:
    return load_documents([RUN_CRD])[0]


def operator_kubeconfig(admin_kubeconfig: Path, pki: Path, out: Path) -> Path:
    """A kubeconfig for the same server with the operator's own client certificate (user OPERATOR_USER).

    Signed by the dev cluster's CA (`<run dir>/pki/ca.key`), in the group
    `system:masters`: every request it makes is allowed and lands in the
    audit log, from which the permissions it needs are learnt (the chart's
    RBAC is compared with them in tests/integration/test_helm_chart.py).
    """
    import base64

    out.mkdir(parents=True, exist_ok=True)
    key, csr, crt, ext = (out / f"operator.{suffix}" for suffix in ("key", "csr", "crt", "ext"))
    ext.write_text("extendedKeyUsage=clientAuth\n")
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj",
                    f"/O=system:masters/CN={OPERATOR_USER}", "-keyout", str(key), "-out", str(csr)],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(pki / "ca.crt"),
                    "-CAkey", str(pki / "ca.key"), "-set_serial", str(int(time.time() * 1000)),
                    "-days", "30", "-extfile", str(ext), "-out", str(crt)], check=True, capture_output=True)
    config = yaml.safe_load(Path(admin_kubeconfig).read_text())
    user = config["users"][0]["user"]
    user["client-certificate-data"] = base64.b64encode(crt.read_bytes()).decode()
    user["client-key-data"] = base64.b64encode(key.read_bytes()).decode()
    path = out / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


# ----------------------------------------------------------------------------- the operator


class OperatorProcess:
    """`noisy-student operator` as a subprocess: start, SIGKILL, restart, peak RSS, log."""

    def __init__(
        self,
        kubeconfig: str | os.PathLike[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        args: Iterable[str] = ("--all-namespaces", "--interval", "1", "--metrics-port", "0"),
        cwd: Path | None = None,
    ) -> None:
        self.kubeconfig = str(kubeconfig)
        self.log_path = log_path
        self.extra_env = dict(env or {})
        self.args = list(args)
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None
        self.liveness_port = 0
        self.starts = 0

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # Only what a Deployment would give it: its kubeconfig and its S3 credentials.
        for name in list(env):
            if name.startswith("AWS_") or name == "KUBECONFIG":
                del env[name]
        env.update(
            KUBECONFIG=self.kubeconfig,
            AWS_CONFIG_FILE=os.devnull,
            AWS_SHARED_CREDENTIALS_FILE=os.devnull,
            PYTHONUNBUFFERED="1",
            # torchrun and the console scripts of this interpreter (local_cwd jobs).
            PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 90.0) -> None:
        """Start the operator and wait until kopf reports itself alive."""
        assert self.process is None or self.process.poll() is not None, "the operator is running"
        self.liveness_port = free_port()
        command = [
            sys.executable, "-m", "noisy_student_operator.cli", "operator", *self.args,
            "--liveness", f"http://127.0.0.1:{self.liveness_port}/healthz",
        ]
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== operator start {self.starts} =====\n".encode())
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.environment(), cwd=self.cwd,
                start_new_session=True,
            )
        wait_for(self.alive, timeout, "the operator's liveness endpoint", interval=0.3, detail=self.log_tail)

    def alive(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"the operator exited with {self.process and self.process.returncode}\n{self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no finalizers, no cleanup — the worst moment for a restart."""
        if self.running:
            assert self.process is not None
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def stop(self, timeout: float = 20.0) -> None:
        if not self.running:
            return
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)

    def restart(self) -> None:
        self.kill()
        self.start()

    def peak_rss_bytes(self) -> int:
        """Peak resident set size (VmHWM) of the running operator process."""
        return self.memory_bytes()["VmHWM"]

    def memory_bytes(self) -> dict[str, int]:
        """The running operator process's resident set size now (VmRSS) and at its peak (VmHWM)."""
        assert self.process is not None
        with open(f"/proc/{self.process.pid}/status") as status:
            sizes = {k: int(v.split()[0]) * 1024 for k, _, v in (line.partition(":") for line in status)
                     if k in ("VmRSS", "VmHWM")}
        if len(sizes) != 2:
            raise RuntimeError("no VmRSS or VmHWM in /proc status")
        return sizes

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "operator log:\n" + "\n".join(text[-lines:])


# ----------------------------------------------------------------------------- Volcano and workloads


def run_document(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "NoisyStudentRun", "metadata": {"name": name}, "spec": spec}


def job_stage(job: dict[str, Any]) -> Stage:
    labels = job["metadata"]["labels"]
    return Stage(int(labels[LABEL_GENERATION]), labels[LABEL_STAGE])


def job_attempt(job: dict[str, Any]) -> int:
    return int(job["metadata"]["labels"][LABEL_ATTEMPT])


def job_phase(job: dict[str, Any]) -> str | None:
    return ((job.get("status") or {}).get("state") or {}).get("phase")


def stage_metrics(stage: Stage) -> dict[str, Any]:
    """Plausible metrics of a completed stage; top-1 grows with the generation."""
    if stage.is_training:
        top1 = round(0.70 + 0.05 * stage.generation, 4)
        return {"top1": top1, "top5": round(min(top1 + 0.2, 1.0), 4), "parameters": 11_000_000 + stage.generation}
    if stage.kind == LABEL:
        return {"images": 4000}
    if stage.kind == BALANCE:
        return {"images": 3000, "per_class": 300}
    if stage.kind == PREPARE:
        return {"labeled": 400, "unlabeled": 3600, "validation": 1000}
    return {}


class Harness:
    """Runs, Volcano Jobs and completion markers on the real servers."""

    def __init__(self, client: Any, operator: OperatorProcess | None = None) -> None:
        from kubernetes import client as k8s

        self.client = client
        self.operator = operator  # its log tail explains a timeout
        self.custom = k8s.CustomObjectsApi(client)
        self.core = k8s.CoreV1Api(client)
        self.namespaces: set[str] = set()

    def _operator_log(self) -> str:
        return self.operator.log_tail() if self.operator else ""

    # -- runs --------------------------------------------------------------------

    def create_run(self, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Create the run (and its namespace, when it is new)."""
        if namespace not in self.namespaces:
            ensure_namespace(self.client, namespace)
            self.namespaces.add(namespace)
        return retry_while_initialising(lambda: self.custom.create_namespaced_custom_object(
            **RUNS, namespace=namespace, body=run_document(name, spec)))

    def get_run(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        try:
            return self.custom.get_namespaced_custom_object(**RUNS, namespace=namespace, name=name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return (self.get_run(namespace, name) or {}).get("status") or {}

    def patch_spec(self, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(
            **RUNS, namespace=namespace, name=name, body={"spec": spec})

    def delete_run(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(**RUNS, namespace=namespace, name=name)

    def wait_run(
        self, namespace: str, name: str, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            status = self.status(namespace, name)
            return status if status and predicate(status) else None

        def describe() -> str:
            status = json.dumps(self.status(namespace, name), indent=1)[-3000:]
            return f"run status: {status}\n{self._operator_log()}"

        return wait_for(probe, timeout, f"run {namespace}/{name}: {what}", detail=describe)

    # -- Volcano -----------------------------------------------------------------

    def jobs(self, namespace: str, run: str | None = None) -> list[dict[str, Any]]:
        selector = f"app.kubernetes.io/managed-by={MANAGED_BY}"
        if run:
            selector += f",{LABEL_RUN}={run}"
        items = self.custom.list_namespaced_custom_object(
            **VOLCANO_JOBS, namespace=namespace, label_selector=selector)["items"]
        return sorted(items, key=lambda j: j["metadata"]["creationTimestamp"] + j["metadata"]["name"])

    def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        try:
            return self.custom.get_namespaced_custom_object(**VOLCANO_JOBS, namespace=namespace, name=name)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def pods(self, namespace: str, job: str, cached: bool = False) -> list[dict[str, Any]]:
        """The pods Volcano made for the Job (as plain dicts, like the custom objects).

        ``cached``: from the API server's watch cache (``resourceVersion=0``), possibly a moment
        behind; for callers that poll anyway. A fresh list is read from etcd, every pod of the
        namespace decoded to filter by label: at a thousand jobs, the API server's busiest request."""
        items = self.core.list_namespaced_pod(namespace, label_selector=f"{VOLCANO_JOB_LABEL}={job}",
                                              **({"resource_version": "0"} if cached else {})).items
        return [self.client.sanitize_for_serialization(pod) for pod in items]

    def replicas(self, namespace: str, job: str) -> int:
        body = self.job(namespace, job)
        assert body is not None, f"Volcano Job {namespace}/{job} is gone"
        return sum(int(task.get("replicas", 1)) for task in body["spec"]["tasks"])

    def running_pods(self, namespace: str, job: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        """Wait until every replica of the Job has a Running pod; return those pods."""
        def probe() -> list[dict[str, Any]] | None:
            pods = [p for p in self.pods(namespace, job, cached=True)
                    if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
            return pods if len(pods) >= self.replicas(namespace, job) else None

        return wait_for(probe, timeout, f"Running pods of every replica of {namespace}/{job}",
                        detail=lambda: self._job_detail(namespace, job))

    def exit_pods(self, namespace: str, job: str, code: int, message: str = "") -> None:
        """What the containers do when the workload ends: exit with `code` (the fast kubelet reports it)."""
        annotations = {EXIT_CODE_ANNOTATION: str(code)}
        if message:
            annotations[EXIT_MESSAGE_ANNOTATION] = message
        for pod in self.running_pods(namespace, job):
            self.core.patch_namespaced_pod(pod["metadata"]["name"], namespace,
                                           {"metadata": {"annotations": annotations}})

    def evict_pods(self, namespace: str, job: str) -> None:
        """What a kubelet under memory pressure does: every running pod Failed/Evicted, with the
        `DisruptionTarget` condition (reason TerminationByKubelet) and its containers killed (137)."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        for pod in self.running_pods(namespace, job):
            containers = [{"name": c["name"], "image": c["image"], "ready": False, "restartCount": 0,
                           "imageID": c.get("imageID", ""), "containerID": c.get("containerID"),
                           "state": {"terminated": {"exitCode": 137, "reason": "Error", "finishedAt": now,
                                                    "startedAt": (c.get("state") or {}).get("running", {}).get(
                                                        "startedAt", now)}}}
                          for c in pod["status"]["containerStatuses"]]
            body = {"status": {
                "phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory.",
                "conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                                "message": "The node was low on resource: memory.", "lastTransitionTime": now}],
                "containerStatuses": containers}}
            self.core.patch_namespaced_pod_status(pod["metadata"]["name"], namespace, body)

    def hold_pods(self, namespace: str, job: str, hold: bool = True) -> None:
        """Keep the Job's pods in the API after they are deleted (a finalizer), as a slow node does.

        While held, a deleted pod stays Terminating, and a Job deleted with
        foreground propagation stays too (with its deletion timestamp):
        what a cluster shows while a cancelled job's pods are still stopping.
        """
        for pod in self.pods(namespace, job):
            # Finalizers merge under a strategic merge patch: removing one needs its directive.
            patch = ({"metadata": {"finalizers": [HOLD_FINALIZER]}} if hold
                     else {"metadata": {"$deleteFromPrimitiveList/finalizers": [HOLD_FINALIZER]}})
            self.core.patch_namespaced_pod(pod["metadata"]["name"], namespace, patch)

    def abort_job(self, namespace: str, name: str) -> None:
        """What `vcctl job suspend` does: a Volcano `Command` AbortJob for the Job. Volcano's job
        controller deletes its pods, holds the Job in `Aborting` until they are gone, then `Aborted`."""
        job = self.job(namespace, name)
        assert job is not None, f"Volcano Job {namespace}/{name} is gone"
        target = {"apiVersion": f"{VOLCANO_JOBS['group']}/{VOLCANO_JOBS['version']}", "kind": "Job", "name": name,
                  "uid": job["metadata"]["uid"], "controller": True}
        command = {"apiVersion": "bus.volcano.sh/v1alpha1", "kind": "Command",
                   "metadata": {"generateName": f"{name}-abortjob-", "ownerReferences": [target]},
                   "action": "AbortJob", "target": target}
        self.custom.create_namespaced_custom_object("bus.volcano.sh", "v1alpha1", namespace, "commands", command)

    def events(self, namespace: str, name: str) -> list[Any]:
        """The Events about object `name` (the run), oldest first."""
        items = [e for e in self.core.list_namespaced_event(namespace).items if e.involved_object.name == name]
        return sorted(items, key=lambda e: (e.last_timestamp or e.event_time or e.first_timestamp, e.reason))

    def set_phase(self, namespace: str, name: str, phase: str, timeout: float = 60.0) -> None:
        """Bring the Volcano Job to `phase` as a cluster does, and wait until Volcano reports it.

        Running: its pods run (the kubelet starts them once Volcano binds them).
        Completed: every container exits with 0. Failed: every container exits
        with 1.
        """
        if phase == "Completed":
            self.exit_pods(namespace, name, 0)
        elif phase == "Failed":
            self.exit_pods(namespace, name, 1, "harness: the workload failed")
        elif phase != "Running":
            raise ValueError(f"set_phase: {phase!r} is not something pods can do")

        def reached() -> bool:
            job = self.job(namespace, name)
            # A finished Job may already be deleted (spec.scheduler.ttlSecondsAfterFinished: 0).
            return job_phase(job) == phase if job is not None else phase != "Running"

        wait_for(reached, timeout,
                 f"Volcano Job {namespace}/{name} {phase}", detail=lambda: self._job_detail(namespace, name))

    def _job_detail(self, namespace: str, name: str) -> str:
        job = self.job(namespace, name)
        pods = [(p["metadata"]["name"], p["spec"].get("nodeName"), p["status"].get("phase"))
                for p in self.pods(namespace, name)]
        return f"job status: {json.dumps((job or {}).get('status'))}\npods: {pods}\n{self._operator_log()}"

    # -- workloads ---------------------------------------------------------------

    def layout(self, namespace: str, run: str) -> RunLayout:
        body = self.get_run(namespace, run)
        assert body is not None, f"run {namespace}/{run} is gone"
        spec, _ = validate_tolerant(RunSpec, body["spec"])  # as the operator reads it
        return RunLayout.for_run(spec, namespace, run)

    def job_name(self, namespace: str, run: str, stage: Stage, attempt: int = 0) -> str:
        """The name the operator gives the job of `stage` (named by its stage key) under the run's spec."""
        return job_name(stage, self.layout(namespace, run).key(stage), attempt)

    def job_names(self, namespace: str, run: str) -> list[str]:
        """First-attempt job names of every stage of the run's current spec, in order."""
        layout = self.layout(namespace, run)
        return [job_name(stage, key, 0) for stage, key in layout.keys.items()]

    def write_marker(self, layout: RunLayout, stage: Stage, metrics: dict[str, Any] | None = None) -> str:
        """The workload's last write: `<stage dir>/_DONE.json` in the real S3 server."""
        from noisy_student_workloads.store import open_store

        uri = layout.marker_uri(stage)
        marker = {
            "stage": stage.kind,
            "metrics": stage_metrics(stage) if metrics is None else metrics,
            "outputs": {},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
        }
        if stage.is_training:
            marker["checkpoint"] = layout.checkpoint_uri(stage.generation)
        open_store(uri).put_json(uri, marker)
        return uri

    def complete(self, namespace: str, job: dict[str, Any], layout: RunLayout | None = None) -> None:
        """The job's workload finished: marker first, then its containers exit with 0 (Volcano: Completed)."""
        labels = job["metadata"]["labels"]
        layout = layout or self.layout(namespace, labels[LABEL_RUN])
        stage = job_stage(job)
        # The workload writes under the key it was given (the job's label), whatever the spec says now.
        layout = RunLayout(layout.root, layout.name, {**layout.keys, stage: labels[LABEL_KEY]})
        self.write_marker(layout, stage)
        self.set_phase(namespace, job["metadata"]["name"], "Completed")

    def next_job(self, namespace: str, run: str, seen: set[str], timeout: float) -> dict[str, Any]:
        """Wait for a job of `run` not in `seen`; add it to `seen`."""
        def probe() -> dict[str, Any] | None:
            fresh = [j for j in self.jobs(namespace, run) if j["metadata"]["name"] not in seen]
            return fresh[0] if fresh else None

        job = wait_for(probe, timeout, f"a new Volcano Job of {namespace}/{run} (seen: {sorted(seen)})",
                       detail=self._operator_log)
        seen.add(job["metadata"]["name"])
        return job


# ----------------------------------------------------------------------------- audit log → RBAC


def audit_args(directory: Path) -> list[str]:
    """API server flags that log every request (metadata only) as JSON lines under `directory`."""
    policy = directory / "audit-policy.yaml"
    policy.write_text(AUDIT_POLICY)
    return [f"--audit-policy-file={policy}", f"--audit-log-path={directory / 'audit.log'}",
            "--audit-log-format=json", "--audit-log-mode=blocking", "--audit-log-maxsize=0"]


def read_audit(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with open(path, errors="replace") as log:
        for line in log:
            line = line.strip()
            if line:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line being written right now


def is_operator_request(event: dict[str, Any]) -> bool:
    return (event.get("user") or {}).get("username") == OPERATOR_USER


def permission_of(event: dict[str, Any]) -> tuple[str, str, str] | None:
    """(apiGroup, resource[/subresource], verb) of a resource request; None for discovery and other paths."""
    ref = event.get("objectRef")
    if not ref or not ref.get("resource"):
        return None
    resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
    return (ref.get("apiGroup") or "", resource, event["verb"])


def operator_permissions(events: Iterable[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """The permissions the operator's own requests needed."""
    return {p for e in events if is_operator_request(e) and (p := permission_of(e)) is not None}


def load_permissions(path: Path = PERMISSIONS_FILE) -> set[tuple[str, str, str]]:
    if not path.exists():
        return set()
    return {(p["apiGroup"], p["resource"], p["verb"]) for p in json.loads(path.read_text())["permissions"]}


def save_permissions(permissions: set[tuple[str, str, str]], path: Path = PERMISSIONS_FILE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"apiGroup": g, "resource": r, "verb": v} for g, r, v in sorted(permissions)]
    text = {
        "description": "Requests the operator made to the API server during tests/integration/test_operator.py "
        "(from the server's audit log). Regenerate: NSO_UPDATE_PERMISSIONS=1 pytest tests/integration/test_operator.py",
        "permissions": rows,
    }
    path.write_text(json.dumps(text, indent=2) + "\n")


def observed_operator_permissions() -> dict[tuple[str, str], set[str]]:
    """{(apiGroup, resource[/subresource]): verbs} the operator was seen using; for RBAC tests of the chart."""
    grouped: dict[tuple[str, str], set[str]] = {}
    for group, resource, verb in load_permissions():
        grouped.setdefault((group, resource), set()).add(verb)
    return grouped
