"""Job backends: the narrow seam between the core's job requests and a scheduler.

`TorchXJobBackend` builds each stage's `AppDef` with the components of
`noisy_student_workloads.components` and submits it through a TorchX runner:

* `kubernetes` — Volcano Jobs. The dry-run request is renamed to the
  deterministic job name before `schedule`, labelled, owned by the run, and its
  pod templates receive the run's S3 Secret by reference (`envFrom`); an
  AlreadyExists answer means the job was submitted before.
  Jobs are observed (one GET each), cancelled (DELETE, confirmed when gone)
  and, once their end is recorded, removed (the same DELETE) through
  `volcano.VolcanoJobs`, not TorchX's describe and cancel.
* `local_cwd` — processes on this host, for the local runner, each replica
  started under `guard` so that it ends with the driver. Handles are only
  valid in the process that launched them; a job this process does not know
  is adopted while processes tagged with its name still run (`processes`:
  never a second copy), else reported missing and resubmitted by the planner.

Tests use `InMemoryJobBackend`, which implements the same interface.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import processes
from .api import API_VERSION, KIND, PlacementFields
from .api import JobStatus as JobRecord
from .core import reasons
from .core.planner import JobObservation, JobState, JobSubmitError
from .core.render import JobRequest
from .volcano import VolcanoJobs, check_names, is_config_error

log = logging.getLogger(__name__)

MANAGED_BY = "noisy-student-operator"
LABEL_RUN = "noisystudent.dev/run"
LABEL_STAGE = "noisystudent.dev/stage"
LABEL_GENERATION = "noisystudent.dev/generation"
LABEL_ATTEMPT = "noisystudent.dev/attempt"
LABEL_KEY = "noisystudent.dev/stage-key"
#: Environment of every job: the run that asked for it (the workload records it in its marker).
ENV_RUN = "NSO_RUN"


@dataclass(frozen=True)
class JobContext:
    """The run a job belongs to."""

    run: str
    namespace: str
    uid: str | None = None
    secret_name: str | None = None
    queue: str = "default"
    env: dict[str, str] = field(default_factory=dict)

    def labels(self, request: JobRequest) -> dict[str, str]:
        return {
            "app.kubernetes.io/managed-by": MANAGED_BY,
            LABEL_RUN: self.run,
            LABEL_STAGE: request.stage.kind,
            LABEL_GENERATION: str(request.stage.generation),
            LABEL_ATTEMPT: str(request.attempt),
            LABEL_KEY: request.key,
        }

    def job_env(self) -> dict[str, str]:
        return {**self.env, ENV_RUN: f"{self.namespace}/{self.run}"}


class JobBackend(Protocol):
    """Submit, observe and cancel stage jobs by their deterministic names."""

    def submit(self, request: JobRequest, context: JobContext) -> str:
        """Create the job if absent; return its handle."""

    def observe(self, jobs: Sequence[JobRecord], context: JobContext) -> dict[str, JobObservation]:
        """Current state of each job, by name (`MISSING` when the scheduler has none)."""

    def cancel(self, job: JobRecord, context: JobContext) -> None:
        """Stop a job; a job that no longer exists is not an error."""

    def remove(self, job: JobRecord, context: JobContext) -> None:
        """Delete a finished job's object; a job that no longer exists is not an error."""

    def log_tail(self, job: JobRecord, lines: int = 40) -> str | None:
        """The end of the job's log, when the backend can read it."""


def render_app(request: JobRequest, image: str, env: dict[str, str]) -> Any:
    """The TorchX `AppDef` of a job request (imports TorchX, not torch)."""
    from noisy_student_workloads import components

    args = dict(request.args)
    args["image"] = image
    args["env"] = env
    args["name"] = request.name
    if request.config is not None:
        args["config"] = json.dumps(request.config, separators=(",", ":"), sort_keys=True)
    component = getattr(components, request.component)
    return component(**args)


def _state_of(app_state: Any) -> JobState:
    from torchx.specs import AppState

    return {
        AppState.UNSUBMITTED: JobState.PENDING,
        AppState.SUBMITTED: JobState.PENDING,
        AppState.PENDING: JobState.PENDING,
        AppState.RUNNING: JobState.RUNNING,
        AppState.SUCCEEDED: JobState.SUCCEEDED,
        AppState.FAILED: JobState.FAILED,
        AppState.CANCELLED: JobState.CANCELLED,
    }.get(app_state, JobState.PENDING)


def render_resources(args: dict[str, Any]) -> Any:
    """Requests equal to limits, memory in MiB as asked (Guaranteed QoS).

    TorchX writes `memMB` as `M` (10^6 bytes) and requests less than the
    limit (it keeps a reserve for system daemons), so pods would be
    Burstable and the first evicted; the run's `memoryMiB` is MiB.
    """
    from kubernetes import client

    amounts = {"cpu": str(args["cpu"]), "memory": f"{args['memMB']}Mi"}
    if args.get("gpu"):
        amounts["nvidia.com/gpu"] = str(args["gpu"])
    return client.V1ResourceRequirements(limits=dict(amounts), requests=dict(amounts))


def harden_pod(spec: Any, service_account: str | None) -> None:
    """Pod Security `restricted`: the image's non-root user, RuntimeDefault seccomp, no
    privilege escalation, no capabilities, and no API token unless the run names a ServiceAccount."""
    from kubernetes import client

    spec.security_context = client.V1PodSecurityContext(
        run_as_non_root=True, seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault")
    )
    for container in spec.containers:
        container.security_context = client.V1SecurityContext(
            allow_privilege_escalation=False,
            capabilities=client.V1Capabilities(drop=["ALL"]),
            run_as_non_root=True,
            seccomp_profile=client.V1SeccompProfile(type="RuntimeDefault"),
        )
    spec.service_account_name = service_account
    spec.automount_service_account_token = bool(service_account)


def place_pod(spec: Any, placement: PlacementFields) -> None:
    """The stage's scheduling fields on its pods."""
    from kubernetes import client

    if placement.priority_class_name:
        spec.priority_class_name = placement.priority_class_name
    if placement.node_selector:
        spec.node_selector = {**(spec.node_selector or {}), **placement.node_selector}
    if placement.tolerations:
        spec.tolerations = [t.to_api() for t in placement.tolerations]
    if placement.affinity:
        spec.affinity = placement.affinity
    if placement.image_pull_secrets:
        spec.image_pull_secrets = [client.V1LocalObjectReference(name=s.name) for s in placement.image_pull_secrets]


#: Each pod's index in its task, from Volcano's `env` plugin (TorchX enables it); Kubernetes expands
#: `$(VAR)` in a container's command and args from the container's environment.
TASK_INDEX = "$(VC_TASK_INDEX)"
#: What TorchX writes into each replica's task that differs between replicas.
_REPLICA_ID_LABEL = "torchx.pytorch.org/replica-id"
_RANK0_HOST = "TORCHX_RANK0_HOST"


def one_task_of_replicas(resource: dict[str, Any], role: str) -> None:
    """Make the label job's tasks, one per replica as TorchX renders them (its replica id written
    into each), one task of N replicas whose pods read their index from Volcano.

    Each copy of the pod template is about 2 kB: a Job of 700 label shards or more was larger
    than etcd stores (1.5 MiB), and every shard made every read of the Job larger. The replicas
    do not meet (no rendezvous), so the rank-0 host TorchX gives them is dropped."""
    tasks = resource["spec"]["tasks"]
    task = tasks[0]
    pod = task["template"]
    for container in pod.spec.containers:
        for field in ("command", "args"):  # TorchX writes it all as the command
            words = list(getattr(container, field) or [])
            if "--replica-id" in words:
                words[words.index("--replica-id") + 1] = TASK_INDEX
                setattr(container, field, words)
        container.env = [e for e in container.env or [] if e.name != _RANK0_HOST]
        container.name = role
    (pod.metadata.labels or {}).pop(_REPLICA_ID_LABEL, None)
    resource["spec"].setdefault("plugins", {}).setdefault("env", [])
    resource["spec"]["tasks"] = [{**task, "name": role, "replicas": len(tasks)}]


def patch_volcano_job(resource: dict[str, Any], request: JobRequest, context: JobContext) -> None:
    """Rename, label and own the Volcano Job; harden, size and place its pods; give them the
    Secret by reference. The operator's own labels win over the run's. A label job's replicas
    become one task (`one_task_of_replicas`)."""
    from kubernetes import client

    if request.component == "label":
        one_task_of_replicas(resource, "label")
    placement = request.placement
    metadata = resource.setdefault("metadata", {})
    metadata["name"] = request.name
    metadata["namespace"] = context.namespace
    metadata.pop("generateName", None)
    labels = {**(placement.labels or {}), **context.labels(request)}
    metadata.setdefault("labels", {}).update(labels)
    if placement.annotations:
        metadata["annotations"] = {**(metadata.get("annotations") or {}), **placement.annotations}
    if placement.priority_class_name:
        resource["spec"]["priorityClassName"] = placement.priority_class_name  # the PodGroup's priority
    if context.uid:
        metadata["ownerReferences"] = [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": context.run,
                "uid": context.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    for task in resource["spec"]["tasks"]:
        pod = task["template"]
        pod.metadata = pod.metadata or client.V1ObjectMeta()
        pod.metadata.labels = {**(pod.metadata.labels or {}), **labels}
        if placement.annotations:
            pod.metadata.annotations = {**(pod.metadata.annotations or {}), **placement.annotations}
        harden_pod(pod.spec, placement.service_account_name)
        place_pod(pod.spec, placement)
        for container in pod.spec.containers:
            container.resources = render_resources(request.args)
            if context.secret_name:
                container.env_from = (container.env_from or []) + [
                    client.V1EnvFromSource(secret_ref=client.V1SecretEnvSource(name=context.secret_name))
                ]


def _server_message(error: Any) -> str:
    """The API server's own message of an `ApiException` (its Status body), else its reason."""
    try:
        body = json.loads(error.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return str(error.reason or "no message").strip()


#: kube-apiserver's words when its admission cannot map a kind it has not rediscovered yet.
_RESTMAPPING_LAG = "cannot find RESTMapping"
#: What the API server answers (a 500) for an object too large to store: etcd's words over its
#: --max-request-bytes (1.5 MiB by default), its gRPC client's over 2 MiB. TorchX renders a task per
#: replica; a label job's are made one (`one_task_of_replicas`), so no shard count comes near it.
_TOO_LARGE_TO_STORE = ("etcdserver: request is too large", "trying to send message larger than max")


def classify_submit_error(error: BaseException) -> JobSubmitError:
    """Permanent (the server or an admission webhook refused the job) or transient (may pass)."""
    from kubernetes.client.rest import ApiException

    if isinstance(error, JobSubmitError):
        return error
    if isinstance(error, ApiException):
        status = int(error.status or 0)
        # 4xx: denied by admission (a webhook, quota, Pod Security), Forbidden, Invalid, no such
        # namespace or CRD — except timeouts, conflicts and throttling, which pass.
        permanent = 400 <= status < 500 and status not in (408, 409, 429)
        message = _server_message(error)
        if status == 403 and _RESTMAPPING_LAG in message:
            # OwnerReferencesPermissionEnforcement maps the owner's kind through the API server's
            # discovery, refreshed every 30 s: right after the CRD is installed (`helm install`,
            # then `kubectl apply`) the owner is "unknown" for a while. It passes on a retry.
            permanent = False
        if any(words in message for words in _TOO_LARGE_TO_STORE):
            permanent = True
        reason = reasons.SUBMIT_REJECTED if permanent else reasons.SUBMIT_FAILED
        return JobSubmitError(f"the API server answered {status} {error.reason}: {message}", reason, permanent)
    if isinstance(error, (ValueError, TypeError, KeyError)):
        # TorchX validating the AppDef or its scheduler options: the same request fails again.
        return JobSubmitError(f"the job was refused before submission: {error}", reasons.SUBMIT_REJECTED, True)
    return JobSubmitError(f"{type(error).__name__}: {error}")


#: TorchX's placeholder for "no message" (`AppStatus.msg`): never shown as one.
TORCHX_NO_MESSAGE = "<NONE>"


def local_failure(torchx_message: str | None, log_tail: str | None) -> str:
    """A failed local job's message: TorchX's own when it has one, and the last lines of its log."""
    message = (torchx_message or "").strip()
    if message in ("", TORCHX_NO_MESSAGE):
        message = "a process exited with an error"
    lines = [line for line in (log_tail or "").splitlines() if line.strip() and not line.startswith("==> ")]
    if lines:
        message += "; the log ends: " + " | ".join(line.strip() for line in lines[-3:])
    return message


def torchelastic_reply(structured_error_msg: str | None) -> str | None:
    """The message of a failed local job's reply file (`TORCHELASTIC_ERROR_FILE`, which TorchX's local
    scheduler returns as `structured_error_msg`): what the workload recorded, or what torchrun's agent
    copied there from its first failed worker (torch's `ErrorHandler` format)."""
    try:
        record = json.loads(structured_error_msg or "")
    except ValueError:
        return None
    message = record.get("message") if isinstance(record, dict) else None
    if isinstance(message, dict):
        message = message.get("message")
    if not isinstance(message, str) or not message.strip():
        return None
    return message.strip()


def default_local_root() -> Path:
    """Working directories and logs of `local_cwd` jobs when the driver names none."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "noisy-student" / "local_cwd"


def _run_opts_once(factory: Callable[..., Any]) -> Callable[..., Any]:
    """The factory, its schedulers answering `run_opts()` with the options built at creation.

    TorchX builds a scheduler's run options from its options class's source (`inspect.getsource`
    and a regular expression over it, for help texts) on every call, three times a dry run: with
    1,000 runs, that was the largest part of the operator's CPU per submission. The options a
    scheduler accepts never change; `resolve` only reads them."""

    def create(*args: Any, **kwargs: Any) -> Any:
        scheduler = factory(*args, **kwargs)
        opts = scheduler.run_opts()
        scheduler.run_opts = lambda: opts
        return scheduler

    return create


def make_runner() -> Any:
    """TorchX's runner with every registered scheduler; `local_cwd` starts replicas that end
    with the driver (`processes.create_scheduler`).

    It forgets the apps it schedules on `kubernetes`: TorchX's `Runner.schedule` keeps every
    AppDef it scheduled (`Runner._apps`, for `describe`; dropped only when a `status` finds the
    app gone), and the operator never asks the runner about a Volcano Job, so its memory grew
    with every job it ever submitted."""
    from torchx.runner import Runner
    from torchx.schedulers import get_scheduler_factories

    class ForgetfulRunner(Runner):
        def schedule(self, dryrun_info: Any) -> Any:
            handle = super().schedule(dryrun_info)
            if dryrun_info._scheduler == "kubernetes":
                self._apps.pop(handle, None)
            return handle

    torchx_factories = get_scheduler_factories()

    def kubernetes_on_our_client(session_name: str, **kwargs: Any) -> Any:
        """TorchX's kubernetes scheduler on the operator's API client (`kube.new_api_client`: a
        connection per worker); its own read the kubeconfig into a fresh configuration that
        keeps 10, so concurrent submissions dropped connections."""
        from .kube import new_api_client

        return torchx_factories["kubernetes"](session_name, client=new_api_client(), **kwargs)

    factories = {**torchx_factories, "kubernetes": kubernetes_on_our_client, "local_cwd": processes.create_scheduler}
    return ForgetfulRunner("torchx", {name: _run_opts_once(factory) for name, factory in factories.items()})


class TorchXJobBackend:
    """Jobs through a TorchX runner on the `kubernetes` or `local_cwd` scheduler."""

    def __init__(
        self,
        scheduler: str,
        local_root: Path | None = None,
        runner: Any = None,
        volcano: VolcanoJobs | None = None,
    ) -> None:
        if scheduler not in ("kubernetes", "local_cwd"):
            raise ValueError(f"scheduler: unsupported TorchX scheduler {scheduler!r}")
        self.scheduler = scheduler
        self.runner = runner or make_runner()
        self.session = getattr(self.runner, "_name", "torchx")
        self.local_root = local_root
        self._handles: dict[str, str] = {}  # local_cwd: name -> handle of this process
        self._log_dirs: dict[str, str] = {}
        self._lock = threading.Lock()
        self._volcano = volcano
        self._explained: Callable[[str, str], None] | None = None

    @property
    def volcano(self) -> VolcanoJobs:
        """The Volcano Jobs seen through the Kubernetes API (created on first use)."""
        if self._volcano is None:
            self._volcano = VolcanoJobs()
            self._volcano.answered = self._answered
        return self._volcano

    def on_explained(self, callback: Callable[[str, str], None]) -> None:
        """Call `callback(namespace, run)` when the explainer learns why a job of the run waits."""
        self._explained = callback
        if self._volcano is not None:
            self._volcano.answered = self._answered

    def _answered(self, namespace: str, labels: Mapping[str, str]) -> None:
        run = labels.get(LABEL_RUN)
        if run and self._explained is not None:
            self._explained(namespace, run)

    # -- kubernetes ------------------------------------------------------------

    def _k8s_handle(self, name: str, namespace: str) -> str:
        return f"kubernetes://{self.session}/{namespace}:{name}"

    def _submit_kubernetes(self, request: JobRequest, context: JobContext, image: str) -> str:
        app = render_app(request, image, context.job_env())
        cfg = {"queue": context.queue, "namespace": context.namespace, "validate_spec": False}
        dryrun = self.runner.dryrun(app, "kubernetes", cfg=cfg)
        patch_volcano_job(dryrun.request.resource, request, context)
        check_names(dryrun.request.resource)
        try:
            self.runner.schedule(dryrun)
        except ValueError as error:
            cause = error.__cause__
            if getattr(cause, "status", None) != 409:
                raise
            log.info("job %s already exists; treating it as submitted", request.name)
        return self._k8s_handle(request.name, context.namespace)

    # -- local_cwd -------------------------------------------------------------

    def _local_tag(self, name: str) -> str:
        return processes.tag(self.local_root or default_local_root(), name)

    def _submit_local(self, request: JobRequest, context: JobContext) -> str:
        from noisy_student_workloads.components import local_env

        leftovers = processes.find(self._local_tag(request.name))
        if leftovers:  # started by a driver that died: adopt them, never start a second copy
            log.warning("adopting %s: its processes %s outlived the driver that started them", request.name, leftovers)
            return f"adopted://{request.name}"
        root = self.local_root or default_local_root()
        workdir = root / "work"
        workdir.mkdir(parents=True, exist_ok=True)
        env = local_env({"PYTHONUNBUFFERED": "1", **context.job_env(),
                         processes.ENV_TAG: self._local_tag(request.name)})
        app = render_app(request, str(workdir), env)
        cfg = {"log_dir": str(root / "logs")}
        dryrun = self.runner.dryrun(app, "local_cwd", cfg=cfg)
        handle = self.runner.schedule(dryrun)
        with self._lock:
            self._handles[request.name] = handle
            self._log_dirs[request.name] = dryrun.request.log_dir
        return handle

    # -- interface ---------------------------------------------------------------

    def submit(self, request: JobRequest, context: JobContext) -> str:
        image = request.args.get("image", "")
        try:
            if self.scheduler == "kubernetes":
                return self._submit_kubernetes(request, context, image)
            return self._submit_local(request, context)
        except Exception as error:
            raise classify_submit_error(error) from error

    def _handle(self, job: JobRecord, context: JobContext) -> str | None:
        if self.scheduler == "kubernetes":
            return job.handle or self._k8s_handle(job.name, context.namespace)
        return self._handles.get(job.name)

    def observe(self, jobs: Sequence[JobRecord], context: JobContext) -> dict[str, JobObservation]:
        if self.scheduler == "kubernetes":
            return {job.name: self.volcano.observe(context.namespace, job.name) for job in jobs}
        observed: dict[str, JobObservation] = {}
        for job in jobs:
            handle = self._handle(job, context)
            status = self.runner.status(handle) if handle else None
            if status is None:
                leftovers = processes.find(self._local_tag(job.name))
                observed[job.name] = JobObservation(
                    JobState.RUNNING, f"adopted: processes {leftovers} of an earlier driver still run"
                ) if leftovers else JobObservation(JobState.MISSING)
                continue
            state = _state_of(status.state)
            message = None
            if not state.active:
                # TorchX reports a cancelled app CANCELLED at once: ended means its processes are gone.
                leftovers = processes.find(self._local_tag(job.name))
                if leftovers:
                    observed[job.name] = JobObservation(JobState.RUNNING, f"stopping: processes {leftovers} still run")
                    continue
            reason = None
            if state is JobState.FAILED:
                reply = torchelastic_reply(status.structured_error_msg)
                message = local_failure(reply or status.msg, self.log_tail(job, lines=5))
                reason = reasons.INVALID_CONFIG if is_config_error(reply) else None
            observed[job.name] = JobObservation(state, message, reason)
        return observed

    def cancel(self, job: JobRecord, context: JobContext) -> None:
        """Ask the job to stop (an error is raised, never swallowed: the planner asks again)."""
        if self.scheduler == "kubernetes":
            self.volcano.delete(context.namespace, job.name)
            return
        handle = self._handle(job, context)
        if handle is not None:
            self.runner.cancel(handle)
        processes.end(processes.find(self._local_tag(job.name)))  # adopted ones too

    def job_changed(self, event_type: str | None, job: dict[str, Any]) -> bool:
        """A Volcano Job of ours as the watch stream delivered it (observe reads it from there);
        False when what a pass reads of it did not change."""
        if self.scheduler == "kubernetes":
            return self.volcano.record(event_type, job)
        return True

    def remove(self, job: JobRecord, context: JobContext) -> None:
        """Delete a finished Volcano Job with its pods and Service; finished local processes leave
        nothing but their logs, which are kept."""
        if self.scheduler == "kubernetes":
            self.volcano.delete(context.namespace, job.name)

    def log_tail(self, job: JobRecord, lines: int = 40) -> str | None:
        log_dir = self._log_dirs.get(job.name)
        if not log_dir or not os.path.isdir(log_dir):
            return None
        files = sorted(Path(log_dir).rglob("stderr.log")) or sorted(Path(log_dir).rglob("*.log"))
        chunks = []
        for path in files:
            text = path.read_text(errors="replace").splitlines()
            if text:
                chunks.append(f"==> {path.relative_to(log_dir)} <==\n" + "\n".join(text[-lines:]))
        return "\n".join(chunks) or None


class InMemoryJobBackend:
    """A backend whose jobs are entries in a dict: for unit tests of the drivers."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobState] = {}
        self.requests: dict[str, JobRequest] = {}
        self.submissions: list[str] = []
        self.cancelled: list[str] = []
        self.removed: list[str] = []

    def submit(self, request: JobRequest, context: JobContext) -> str:
        self.submissions.append(request.name)
        if request.name not in self.jobs:
            self.jobs[request.name] = JobState.RUNNING
            self.requests[request.name] = request
        return f"memory://{context.namespace}/{request.name}"

    def observe(self, jobs: Sequence[JobRecord], context: JobContext) -> dict[str, JobObservation]:
        return {j.name: JobObservation(self.jobs.get(j.name, JobState.MISSING)) for j in jobs}

    def cancel(self, job: JobRecord, context: JobContext) -> None:
        self.cancelled.append(job.name)
        if job.name in self.jobs:
            self.jobs[job.name] = JobState.CANCELLED

    def remove(self, job: JobRecord, context: JobContext) -> None:
        self.removed.append(job.name)
        self.jobs.pop(job.name, None)

    def log_tail(self, job: JobRecord, lines: int = 40) -> str | None:
        return None
