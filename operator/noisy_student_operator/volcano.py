"""Volcano Jobs as the operator observes and stops them.

* **Observe**: from the operator's watch of its Volcano Jobs (`record`, fed
  by the kopf Job handler), else one GET of the Volcano Job; a Job the watch
  has not shown for `WATCHED_FOR` seconds is read again (a deletion the watch
  missed while it reconnected cannot keep a job alive), so a running job costs
  at most one GET a minute, whatever the number of passes. TorchX's
  `describe` GETs the Job's status and then a pod per task; and its messages
  are `<NONE>`. Only when a message is needed (the job failed, or waits to
  start) are its pods listed, once, by Volcano's `volcano.sh/job-name` label;
  a waiting Job whose pods say nothing (Volcano has not created them: the
  gang does not fit) gets its PodGroup read for Volcano's `Unschedulable`
  condition, or, before the gang is admitted, the Events about the PodGroup.
  Those are up to three reads, so a waiting Job is asked why once it has
  waited `EXPLAIN_PENDING_AFTER` seconds and then at most that often: most
  Jobs wait a second or two for Volcano to place their pods, and at 1,000
  runs those reads were most of the operator's requests. The pods and the
  PodGroup come from the API server's watch cache, but it keeps none of
  Events (kube-apiserver's `DefaultWatchCacheSizes`): each Events list reads
  every Event of the namespace from etcd, seconds each once a namespace
  holds tens of thousands. So no pass asks: a pass over a Job due to be
  asked queues it, and one explainer thread asks the queued Jobs one at a
  time, at most `EXPLAIN_PER_SECOND` a second, whatever their number; an
  answer calls `answered` (the operator asks for a pass of the Job's run at
  once), that pass reports it, and until then the run's status keeps the
  last one.
* **Cancel**: a DELETE with foreground propagation. The Job object stays
  (with a deletion timestamp) until the garbage collector has deleted its
  pods, so "gone" (404) means no pod of it runs any more. TorchX's cancel
  instead writes the phase `Aborted` into the Job's status (GET + PUT, where
  a 409 is an error), and Volcano then kills the pods — the Job reads
  finished while its pods still run. A Job in `Aborting`, `Terminating`,
  `Restarting` or `Completing`, or being deleted, is still running.
"""

from __future__ import annotations

import contextvars
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from noisy_student_workloads.stage import CONFIG_ERROR_EXIT_CODE, CONFIG_ERROR_PREFIX

from . import api, kube
from .core import reasons
from .core.planner import JobObservation, JobState, JobSubmitError
from .kube import get_custom_object

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "batch.volcano.sh", "v1alpha1", "jobs"
#: Volcano's scheduler says on a Job's PodGroup (`<job>-<job uid>`) why the gang cannot be scheduled.
PODGROUPS = ("scheduling.volcano.sh", "v1beta1", "podgroups")
#: The label Volcano's job controller puts on every pod of a Job.
JOB_NAME_LABEL = "volcano.sh/job-name"
#: Seconds a Job as the watch last showed it stands for a GET.
WATCHED_FOR = 60.0
#: Seconds a Job waits to start before it is asked why (and between two askings).
EXPLAIN_PENDING_AFTER = 10.0
#: Waiting Jobs asked why per second, across the operator, one at a time (see `VolcanoJobs.explain`):
#: with 1,000 runs' new Jobs waiting on a busy cluster, every pass asked, and the Events lists
#: (from etcd) of the passes the next stages waited on took seconds each.
EXPLAIN_PER_SECOND = 2.0

PHASES = {
    "Pending": JobState.PENDING,
    "Running": JobState.RUNNING,
    "Restarting": JobState.RUNNING,
    "Completing": JobState.RUNNING,
    "Aborting": JobState.RUNNING,
    "Terminating": JobState.RUNNING,
    "Completed": JobState.SUCCEEDED,
    "Failed": JobState.FAILED,
    "Terminated": JobState.FAILED,
    "Aborted": JobState.CANCELLED,
}


DNS_LABEL_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_LABEL = 63


def check_names(resource: dict[str, Any]) -> None:
    """Refuse, before submitting, a Job whose derived names Volcano or Kubernetes would refuse.

    Volcano names pods `<job>-<task>-<replica index>` (at most 63 characters);
    its admission webhook (`admit_job.go`, `validateK8sPodNameLength`) checks
    `<job>-<task>-<position of the task>`, so both are checked. Its `svc`
    plugin names a Service and host names after the Job (a DNS-1035 label).
    """
    name = resource["metadata"]["name"]
    problems = []
    if len(name) > MAX_LABEL or not re.match(api.DNS_LABEL_1035, name):
        problems.append(f"job name {name!r} is not a DNS-1035 label of at most {MAX_LABEL} characters")
    for position, task in enumerate(resource["spec"]["tasks"]):
        pod = f"{name}-{task['name']}-{max(int(task.get('replicas', 1)) - 1, position)}"
        if len(pod) > MAX_LABEL or not DNS_LABEL_1123.match(pod):
            problems.append(f"pod name {pod!r} is not a DNS-1123 label of at most {MAX_LABEL} characters")
    if problems:
        raise JobSubmitError("; ".join(problems), reasons.SUBMIT_REJECTED, permanent=True)


def job_state(job: dict[str, Any]) -> JobState:
    """Our state of a Volcano Job object (a Job being deleted is running until it is gone)."""
    phase = ((job.get("status") or {}).get("state") or {}).get("phase") or "Pending"
    state = PHASES.get(phase, JobState.PENDING)
    if job["metadata"].get("deletionTimestamp") and state.active:
        return JobState.RUNNING
    return state


def _terminated(pod: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return [(s["name"], s["state"]["terminated"]) for s in statuses if (s.get("state") or {}).get("terminated")]


#: Pod `status.reason`s of a pod that the cluster, not the workload, ended.
DISRUPTED_POD_REASONS = ("Evicted", "Preempted", "NodeLost", "NodeShutdown", "Shutdown", "Terminated")


def is_config_error(message: str | None) -> bool:
    """Whether a workload's termination message (or torchrun's error record) reports a configuration
    error: the workloads exit 2 then, but torchrun's agent, which runs the training stages, exits 1
    whatever its worker's exit code (`noisy_student_workloads.stage.report_config_error`)."""
    return (message or "").startswith(CONFIG_ERROR_PREFIX)


def _disruption(pod: dict[str, Any]) -> str | None:
    """Why the cluster ended this pod (DisruptionTarget condition, eviction, node loss), if it did."""
    status = pod.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") == "DisruptionTarget" and condition.get("status") == "True":
            return ": ".join(x for x in (condition.get("reason"), (condition.get("message") or "").strip()) if x)
    if status.get("reason") in DISRUPTED_POD_REASONS:
        return ": ".join(x for x in (status["reason"], (status.get("message") or "").strip()) if x)
    return None


def pod_failure(pods: list[dict[str, Any]], namespace: str) -> tuple[str, str | None] | None:
    """(message, reason) of the first failed pod: disrupted, failed container (exit code, reason,
    message, a logs hint), or failed pod; reason is DISRUPTED, INVALID_CONFIG or None."""
    ordered = sorted(pods, key=lambda p: p["metadata"]["name"])
    for pod in ordered:  # a disruption explains the other pods' failures (the gang lost a member)
        disruption = _disruption(pod)
        if disruption:
            return f"pod {pod['metadata']['name']} was disrupted ({disruption})", reasons.DISRUPTED
    for pod in ordered:
        name = pod["metadata"]["name"]
        for container, terminated in _terminated(pod):
            code = terminated.get("exitCode")
            if not code:
                continue
            text = f"pod {name} container {container} exited with code {code}"
            if terminated.get("reason"):
                text += f" ({terminated['reason']})"
            if (terminated.get("message") or "").strip():
                text += f": {terminated['message'].strip()}"
            config_error = code == CONFIG_ERROR_EXIT_CODE or is_config_error(terminated.get("message"))
            reason = reasons.INVALID_CONFIG if config_error else None
            return f"{text}; see `kubectl logs -n {namespace} {name} -c {container}`", reason
        status = pod.get("status") or {}
        if status.get("phase") == "Failed" and status.get("reason"):
            message = (status.get("message") or "").strip()
            return f"pod {name} failed ({status['reason']})" + (f": {message}" if message else ""), None
    return None


def job_failure(job: dict[str, Any], pods: list[dict[str, Any]]) -> tuple[str, str | None]:
    """A failed Job's (message, reason) from what the cluster knows: its pods first, then Volcano's state."""
    meta = job["metadata"]
    state = (job.get("status") or {}).get("state") or {}
    found = pod_failure(pods, meta.get("namespace") or "default")
    volcano = f"Volcano Job {meta['name']} is {state.get('phase', 'Failed')}"
    detail = ": ".join(x for x in (state.get("reason"), state.get("message")) if x)
    if detail:
        volcano += f" ({detail})"
    if found is None:
        return volcano, None
    return f"{found[0]}; {volcano}", found[1]


def podgroup_reason(podgroup: dict[str, Any] | None, events: list[dict[str, Any]] = ()) -> str | None:
    """Why Volcano does not schedule a Job's gang: its PodGroup's `Unschedulable` condition (set once
    the pods exist), else the latest `Unschedulable` Event about the PodGroup (all there is while
    the gang is not admitted: "resource in cluster is overused", "queue resource quota insufficient")."""
    for condition in ((podgroup or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Unschedulable" and condition.get("status") == "True":
            detail = ": ".join(x for x in (condition.get("reason"), (condition.get("message") or "").strip()) if x)
            return f"Volcano cannot schedule the job ({detail or 'Unschedulable'})"
    said = [e for e in events if e.get("reason") == "Unschedulable" and (e.get("message") or "").strip()]
    if said:
        latest = max(said, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")
        return f"Volcano cannot schedule the job ({latest['message'].strip()})"
    return None


def pod_reason(pods: list[dict[str, Any]]) -> str | None:
    """Why the first waiting pod waits (its container's waiting reason, or not scheduled), if one says."""
    for pod in sorted(pods, key=lambda p: p["metadata"]["name"]):
        status = pod.get("status") or {}
        name = pod["metadata"]["name"]
        for container in status.get("containerStatuses") or []:
            waiting = (container.get("state") or {}).get("waiting")
            if waiting and waiting.get("reason") not in (None, "ContainerCreating"):
                message = (waiting.get("message") or "").strip()
                return f"pod {name}: {waiting['reason']}" + (f": {message}" if message else "")
        for condition in status.get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                message = (condition.get("message") or "").strip()
                return f"pod {name} is not scheduled ({condition.get('reason')})" + (
                    f": {message}" if message else "")
    return None


def pending_reason(job: dict[str, Any], pods: list[dict[str, Any]], podgroup: dict[str, Any] | None = None,
                   podgroup_events: list[dict[str, Any]] = ()) -> str:
    """Why a Pending Job has not started: its first waiting pod's reason, else what Volcano says
    about its PodGroup, else where Volcano stands."""
    found = pod_reason(pods) or podgroup_reason(podgroup, podgroup_events)
    if found:
        return found
    queue = (job.get("spec") or {}).get("queue") or "default"
    if not pods:
        return f"Volcano has not created its pods yet (queue {queue}: waiting for enough resources)"
    return f"{len(pods)} pod(s) created, none running yet (queue {queue})"


def _observed_part(job: dict[str, Any]) -> dict[str, Any]:
    """What `observe` reads of a Job (kept per Job: its spec's pod templates are not)."""
    meta = job["metadata"]
    kept = {key: meta[key] for key in ("name", "namespace", "uid", "labels", "deletionTimestamp") if meta.get(key)}
    return {"metadata": kept, "spec": {"queue": (job.get("spec") or {}).get("queue")},
            "status": {"state": dict((job.get("status") or {}).get("state") or {})}}


class VolcanoJobs:
    """The Volcano Jobs of a namespace through the Kubernetes API: get, pods of, delete."""

    def __init__(
        self, api_client: Any = None, clock: Any = time.monotonic, explainer: bool = True, sleep: Any = time.sleep
    ) -> None:
        """`explainer`: ask why Jobs wait on a thread of its own (started on the first asking);
        without it, `explain` is called by hand (tests)."""
        from kubernetes import client

        api_client = api_client or kube.new_api_client()
        self.objects = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.clock = clock
        self.sleep = sleep
        self._watched: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}  # → (when, what observe reads)
        self._asked: dict[tuple[str, str], float] = {}  # a waiting Job → when it is due to be asked why
        self._queue: deque[tuple[tuple[str, str], dict[str, Any]]] = deque()  # due, not asked yet: the Job
        self._queued: set[tuple[str, str]] = set()
        self._answers: dict[tuple[str, str], str] = {}  # answered, not reported by a pass yet
        self._lock = threading.Condition()
        self._background = explainer
        self._explainer: threading.Thread | None = None
        #: Called (namespace, the Job's labels) on the explainer's thread when it has an answer
        #: for a waiting Job, so that a pass of its run can report it now rather than on its timer.
        self.answered: Callable[[str, Mapping[str, str]], None] | None = None

    def record(self, event_type: str | None, job: dict[str, Any]) -> bool:
        """A Job as the watch stream delivered it (None: listed at start; DELETED: gone); False when
        what `observe` reads of it is what it was (Volcano rewrites a Job's status as each of its
        pods starts or ends: its counts, which no pass reads)."""
        meta = job["metadata"]
        key = (meta.get("namespace") or "default", meta["name"])
        with self._lock:
            if event_type == "DELETED":
                self._watched.pop(key, None)
                self._asked.pop(key, None)
                self._answers.pop(key, None)
                return True
            part = _observed_part(job)
            previous = self._watched.get(key)
            self._watched[key] = (self.clock(), part)
            return previous is None or previous[1] != part

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Job as the watch showed it within `WATCHED_FOR` seconds, else as a GET reads it."""
        key = (namespace, name)
        with self._lock:
            seen = self._watched.get(key)
        if seen is not None and self.clock() - seen[0] < WATCHED_FOR:
            return seen[1]
        job = get_custom_object(self.objects, GROUP, VERSION, namespace, PLURAL, name, cached=True)
        with self._lock:
            if job is None:
                self._watched.pop(key, None)
            else:
                self._watched[key] = (self.clock(), _observed_part(job))
        return job

    def watched(self) -> int:
        with self._lock:
            return len(self._watched)

    def pods(self, namespace: str, name: str, cached: bool = False) -> list[dict[str, Any]]:
        """The Job's pods; `cached`: from the API server's watch cache (resourceVersion 0), for
        what is asked on every pass of a waiting Job (why it waits). A list by label read from
        etcd reads every pod of the namespace: with 1,000 runs in one namespace, those lists
        took seconds each and held kopf's workers. A failure is read from etcd (its message,
        and whether the configuration is wrong, is recorded once)."""
        api_client = self.core.api_client
        options = {"resource_version": "0"} if cached else {}
        listing = self.core.list_namespaced_pod(namespace, label_selector=f"{JOB_NAME_LABEL}={name}", **options)
        return [api_client.sanitize_for_serialization(pod) for pod in listing.items]

    def podgroup(self, job: dict[str, Any]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
        """The Job's PodGroup (`<job>-<uid>`) and, while the gang is not admitted (phase `Pending`:
        Volcano's scheduler says why only in Events then; once admitted, its pods and the
        PodGroup's condition say), the Events about it."""
        meta = job["metadata"]
        name = f"{meta['name']}-{meta['uid']}"
        group, version, plural = PODGROUPS
        podgroup = get_custom_object(self.objects, group, version, meta["namespace"], plural, name, cached=True)
        if podgroup is None or podgroup_reason(podgroup) or (podgroup.get("status") or {}).get("phase") not in (
                None, "Pending"):
            return podgroup, []
        listing = self.core.list_namespaced_event(  # from etcd: the API server caches no Events
            meta["namespace"], field_selector=f"involvedObject.kind=PodGroup,involvedObject.name={name}",
            resource_version="0")
        return podgroup, [self.core.api_client.sanitize_for_serialization(e) for e in listing.items]

    def delete(self, namespace: str, name: str) -> None:
        """Delete the Job and, before it disappears, its pods; a Job already gone is not an error."""
        from kubernetes.client.rest import ApiException

        try:
            self.objects.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Foreground"
            )
        except ApiException as error:
            if error.status != 404:
                raise

    def observe(self, namespace: str, name: str) -> JobObservation:
        job, key = self.get(namespace, name), (namespace, name)
        state = job_state(job) if job is not None else JobState.MISSING
        if state is JobState.PENDING:
            return JobObservation(state, self._waiting(key, job))
        with self._lock:  # not waiting (any more): nothing to ask
            self._asked.pop(key, None)
            self._answers.pop(key, None)
        if state is JobState.FAILED:
            message, reason = job_failure(job, self.pods(namespace, name))
            return JobObservation(state, message, reason)
        return JobObservation(state)

    def _waiting(self, key: tuple[str, str], job: dict[str, Any]) -> str | None:
        """A pass over a waiting Job: why it waits, when the explainer answered since the last
        pass (None leaves the run's status with the last answer). A Job due to be asked is
        queued for the explainer, never asked here; once asked, it is due again when every
        other waiting Job could have had its turn (round-robin)."""
        now = self.clock()
        with self._lock:
            due = self._asked.setdefault(key, now + EXPLAIN_PENDING_AFTER)
            if now >= due and key not in self._queued:
                self._asked[key] = now + max(EXPLAIN_PENDING_AFTER, len(self._asked) / EXPLAIN_PER_SECOND)
                self._queued.add(key)
                self._queue.append((key, _observed_part(job)))
                if self._background and self._explainer is None:
                    # In a copy of this pass's context (kopf's): the passes `answered` asks for post Events.
                    self._explainer = threading.Thread(target=contextvars.copy_context().run,
                                                       args=(self._explain_forever,), name="explainer", daemon=True)
                    self._explainer.start()
                self._lock.notify()
            return self._answers.pop(key, None)

    def explain(self) -> int:
        """Ask each queued Job that still waits why, one at a time, pausing 1/`EXPLAIN_PER_SECOND`
        s after each; returns how many were asked. A failed asking is left to the Job's next turn."""
        asked = 0
        while True:
            with self._lock:
                if not self._queue:
                    return asked
                key, job = self._queue.popleft()
                self._queued.discard(key)
                if key not in self._asked:  # started, failed or gone meanwhile
                    continue
            try:
                answer = self._why_pending(job)
            except Exception as error:  # the API server is busy: the Job's next turn asks again
                log.debug("asking why %s/%s waits failed: %s", *key, error)
                answer = None
            asked += 1
            with self._lock:
                fresh = answer is not None and key in self._asked
                if fresh:
                    self._answers[key] = answer
            if fresh and self.answered is not None:
                try:
                    self.answered(key[0], job["metadata"].get("labels") or {})
                except Exception:  # the run's timer reports it instead
                    log.debug("could not ask for a pass of %s/%s's run", *key, exc_info=True)
            self.sleep(1.0 / EXPLAIN_PER_SECOND)

    def _explain_forever(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    self._lock.wait()
            self.explain()

    def _why_pending(self, job: dict[str, Any]) -> str:
        meta = job["metadata"]
        pods = self.pods(meta["namespace"], meta["name"], cached=True)
        podgroup, events = (None, []) if pod_reason(pods) else self.podgroup(job)  # when the pods do not say
        return pending_reason(job, pods, podgroup, events)
