"""The operator's reconcile of one NoisyStudentRun, independent of kopf.

`RunController.reconcile(namespace, name)` reads the run (from the API
server's watch cache, or the body kopf's watch holds), runs the shared
observe → plan → act pass, posts the plan's Events, updates metrics, and
writes the full status when it changed. Passes over the same run are
serialised by a per-run lock. Status writes carry the resourceVersion that
was read: when the run changed meanwhile, or what was read was stale (409),
the pass is done again from a fresh read from etcd (its actions are
idempotent), never written over what the other wrote.

A pass that fails (the artifact store or the API server cannot be read)
still reports: the run's `Ready` condition says why (`ArtifactStoreError`,
`ReconcileError`) and one Warning Event is posted per distinct error, never
one per pass. When the plan asks to look again at a given time (a retry's
backoff), `requeue(namespace, name, seconds)` is called, so the retry
happens to the second rather than at the next timer tick.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from . import metrics
from .api import RunFileError, RunSpec, RunStatus, SchedulerSpec, parse_run, validate_tolerant
from .backend import JobBackend, JobContext
from .core import reasons
from .core.conditions import is_true, set_condition
from .core.keys import workload_identity
from .core.planner import ACTIVE_STATES, CANCELLING, FINISHED_STATES, Plan, RunRef, Submit
from .kube import Conflict
from .reconcile import ArtifactStoreError, Reconciler, utcnow

log = logging.getLogger(__name__)

EventFn = Callable[[Any, str, str, str], None]
RequeueFn = Callable[[str, str, float], None]
DEFAULT_TTL = SchedulerSpec.model_fields["ttl_seconds_after_finished"].default
#: Tries again after a status write met a newer run (a pass, or the same status when only the
#: run's metadata changed: `RunController._write_status`), before the error is reported.
CONFLICT_RETRIES = 3


class InvalidRun(ValueError):
    """The stored spec does not validate (something the CRD schema cannot express)."""

    reason = reasons.INVALID_SPEC


class SchedulerNotServed(InvalidRun):
    """The run asks for a scheduler this operator was not started to serve."""

    reason = reasons.SCHEDULER_NOT_SERVED


def _planned_from(body: dict[str, Any]) -> tuple[Any, ...]:
    """What a pass reads of a run (`RunController._ref`, `_context`), and whether it is being deleted."""
    meta = body["metadata"]
    return (body.get("apiVersion"), body.get("kind"), body.get("spec"), body.get("status"),
            *(meta.get(k) for k in ("uid", "generation", "deletionTimestamp")))


def _removals(body: Any) -> list[datetime]:
    """When each finished job of the run that still has its object is due to be removed."""
    scheduler = (body.get("spec") or {}).get("scheduler") or {}
    ttl = timedelta(seconds=int(scheduler.get("ttlSecondsAfterFinished", DEFAULT_TTL)))
    return [datetime.fromisoformat(job["finishedAt"]) + ttl
            for job in (body.get("status") or {}).get("jobs") or []
            if job.get("state") in FINISHED_STATES and job.get("finishedAt") and not job.get("removedAt")]


def _no_events(body: Any, type_: str, reason: str, message: str) -> None:
    log.info("%s %s: %s", type_, reason, message)


def _no_requeue(namespace: str, name: str, seconds: float) -> None:
    """Without a requeue hook the next timer tick looks again."""


class RunController:
    """Reconcile NoisyStudentRuns stored in the API server."""

    def __init__(
        self,
        runs_api: Any,
        backends: dict[str, JobBackend],
        reconciler_for: Callable[[JobBackend], Reconciler] = Reconciler,
        scheduler_override: str | None = None,
        post_event: EventFn = _no_events,
        requeue: RequeueFn = _no_requeue,
    ) -> None:
        self.runs_api = runs_api
        self.backends = backends
        self.reconcilers = {name: reconciler_for(backend) for name, backend in backends.items()}
        self.scheduler_override = scheduler_override
        self.post_event = post_event
        self.requeue = requeue
        self._errors: dict[str, str] = {}  # the last failed pass's message, by run
        #: The resourceVersion each run had when this operator last wrote its status: a body read
        #: with it (kopf's, the watch cache's) predates that write.
        self._written_over: dict[str, str] = {}
        self._locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._conditions: dict[str, str] = {}
        #: When a job of each run was seen ending (monotonic), until a pass has looked at the run.
        self._ended: dict[str, float] = {}

    # -- parsing -----------------------------------------------------------------

    def _ref(self, body: dict[str, Any]) -> RunRef:
        meta = body["metadata"]
        document = {key: body[key] for key in ("apiVersion", "kind", "spec") if key in body}
        document["metadata"] = {"name": meta["name"], "namespace": meta.get("namespace") or "default"}
        source = f"{document['metadata']['namespace']}/{meta['name']}"
        try:
            # Stored objects may carry fields of a newer version (a rollback, a Helm upgrade): read them.
            run = parse_run(document, source, tolerant=True)
        except RunFileError as error:
            raise InvalidRun(str(error)) from None
        status, ignored = validate_tolerant(RunStatus, body.get("status") or {})
        if ignored:
            log.warning("%s: ignored status fields this version does not know: %s", source, ", ".join(ignored))
        workload = workload_identity(run.spec, self._scheduler(run.spec))
        return RunRef(run.metadata.name, run.metadata.namespace, run.spec, status, meta.get("generation"), workload)

    def _scheduler(self, spec: RunSpec) -> str:
        return self.scheduler_override or spec.scheduler.name

    def _context(self, body: dict[str, Any], spec: RunSpec) -> JobContext:
        meta = body["metadata"]
        secret = spec.artifacts.secret_ref
        return JobContext(
            run=meta["name"],
            namespace=meta.get("namespace") or "default",
            uid=meta.get("uid"),
            secret_name=secret.name if secret else None,
            queue=spec.scheduler.queue,
        )

    def settled(self, body: Any) -> bool:
        """Finished (Succeeded or Failed), no spec change since, no cancel to confirm, no finished
        job left to remove: nothing to do."""
        return self._finished_and_unchanged(body) and not _removals(body)

    def idle(self, body: Any, now: datetime | None = None) -> bool:
        """Settled but for finished jobs whose removal is not due yet: a timer tick has nothing to do
        (their pass is requeued at the due time; after a restart the resume pass requeues it)."""
        now = now or utcnow()
        return self._finished_and_unchanged(body) and all(due > now for due in _removals(body))

    def removal_due_in(self, body: Any, now: datetime | None = None) -> float | None:
        """Seconds until the next removal of a finished job, when that is all an idle run waits for."""
        now = now or utcnow()
        due = _removals(body)
        if not due or not self.idle(body, now):
            return None
        return (min(due) - now).total_seconds()

    @staticmethod
    def _finished_and_unchanged(body: Any) -> bool:
        status = body.get("status") or {}
        conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
        finished = conditions.get(reasons.SUCCEEDED) == "True" or conditions.get(reasons.FAILED) == "True"
        cancelling = any(job.get("state") == CANCELLING for job in status.get("jobs") or [])
        return finished and not cancelling and status.get("observedGeneration") == body["metadata"].get("generation")

    # -- passes ------------------------------------------------------------------

    def reconcile(
        self, namespace: str, name: str, unless_idle: bool = False, body: Any = None
    ) -> Plan | None:
        """One pass; None when the run is gone or the pass failed (its error is in status), or,
        with `unless_idle` (a hint from a Job of the run), when the run has nothing to do now.

        `body`: the run as the watch stream last showed it (a timer's), read instead of a GET;
        without it, the run is read from the API server's watch cache. If what was read is
        stale, the status write meets the newer run (409) and the pass is done again from a
        fresh read (from etcd), unless only what a pass does not read changed (`_write_status`)."""
        started = time.perf_counter()
        key = f"{namespace}/{name}"
        with self._locks[key]:
            ended = self._ended.pop(key, None)  # this pass sees that end: it submits what follows, or nothing will
            body = copy.deepcopy(dict(body)) if body is not None else self.runs_api.get(namespace, name, cached=True)
            if body is not None and body["metadata"].get("resourceVersion") == self._written_over.get(key, ""):
                # It predates this operator's last status write (the watch has not delivered that yet):
                # acting on it would ask again for what that pass did, and its write would meet a 409.
                body = self.runs_api.get(namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return None
            if unless_idle and self.idle(body):
                return None
            try:
                plan = self._reconcile_fresh(namespace, name, body)
                if plan is None:
                    return None
            except InvalidRun as error:
                self._mark_invalid(body, error)
                raise
            except Exception as error:
                metrics.RECONCILE_ERRORS.inc()
                self._report_error(body, error)
                return None
            finally:
                metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)
            self._errors.pop(key, None)
            if ended is not None and any(isinstance(a, Submit) and a.request.attempt == 0 and not a.resubmit
                                         for a in plan.actions):
                metrics.HANDOFF_SECONDS.observe(time.monotonic() - ended)
        if plan.requeue_after is not None:
            self.requeue(namespace, name, plan.requeue_after)
        return plan

    def _report_error(self, body: dict[str, Any], error: Exception) -> None:
        """Say in status why the pass failed; one Event per distinct error."""
        meta = body["metadata"]
        namespace, name = meta.get("namespace") or "default", meta["name"]
        reason = reasons.ARTIFACT_STORE_ERROR if isinstance(error, ArtifactStoreError) else reasons.RECONCILE_ERROR
        message = f"{error}"
        log.warning("reconcile of %s/%s failed: %s", namespace, name, message, exc_info=not isinstance(
            error, ArtifactStoreError))
        if self._errors.get(f"{namespace}/{name}") == message:
            return
        self._errors[f"{namespace}/{name}"] = message
        self.post_event(body, "Warning", reason, message)
        status, _ = validate_tolerant(RunStatus, body.get("status") or {})
        conditions = set_condition(status.conditions, reasons.READY, False, reason, message, utcnow(),
                                   meta.get("generation"))
        try:
            self.runs_api.patch_status(namespace, name, {
                "conditions": [c.model_dump(mode="json", by_alias=True) for c in conditions]})
        except Exception:  # the API server is what failed: the next pass reports again
            log.warning("could not record the error of %s/%s in status", namespace, name, exc_info=True)
            self._errors.pop(f"{namespace}/{name}", None)

    def _reconciler(self, spec: RunSpec) -> Reconciler:
        scheduler = self._scheduler(spec)
        if scheduler not in self.reconcilers:
            served = ", ".join(sorted(self.reconcilers))
            raise SchedulerNotServed(
                f"spec.scheduler.name: {scheduler} is not served by this operator (it serves {served}); "
                f"local_cwd would run the stages as processes inside the operator's pod, with its "
                f"credentials, so an operator serves it only when started with --scheduler local_cwd"
            )
        return self.reconcilers[scheduler]

    def _reconcile_fresh(self, namespace: str, name: str, body: dict[str, Any]) -> Plan | None:
        """The pass, done again from a fresh read when its status write meets a newer run."""
        for _ in range(CONFLICT_RETRIES):
            try:
                return self._reconcile(body)
            except Conflict:
                log.info("%s/%s changed during the pass; reading it again", namespace, name)
                body = self.runs_api.get(namespace, name)
                if body is None or body["metadata"].get("deletionTimestamp"):
                    return None
        return self._reconcile(body)

    def _reconcile(self, body: dict[str, Any]) -> Plan:
        run = self._ref(body)
        context = self._context(body, run.spec)
        reconciler = self._reconciler(run.spec)
        plan = reconciler.reconcile(run, context)
        self._record_metrics(run.status, plan)
        new_status = plan.status.model_dump(mode="json", by_alias=True)
        old_status = run.status.model_dump(mode="json", by_alias=True)
        if new_status != old_status:
            self._write_status(run, body, new_status)
        for event in plan.events:
            self.post_event(body, event.type, event.reason, event.message)
        return plan

    def _write_status(self, run: RunRef, body: dict[str, Any], status: dict[str, Any]) -> None:
        """Write a pass's status against the version it read (409 Conflict when the run changed since).

        When the change is outside what a pass reads (`_planned_from`: kopf's annotations and
        finalizers, labels), the plan stands and the status is written against the new version:
        planning again would ask once more for each job the pass submitted (a create answered
        409 each). A change of spec or status still raises `Conflict` (the pass is done again).
        """
        version = body["metadata"].get("resourceVersion")
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                self.runs_api.patch_status(run.namespace, run.name, status, version)
                break
            except Conflict:
                fresh = self.runs_api.get(run.namespace, run.name) if attempt < CONFLICT_RETRIES else None
                if fresh is None or _planned_from(fresh) != _planned_from(body):
                    raise
                log.debug("%s/%s: only its metadata changed during the pass", run.namespace, run.name)
                version = fresh["metadata"].get("resourceVersion")
        if version is not None:
            self._written_over[f"{run.namespace}/{run.name}"] = version

    def _mark_invalid(self, body: dict[str, Any], error: InvalidRun) -> None:
        meta = body["metadata"]
        message = str(error)
        status, _ = validate_tolerant(RunStatus, body.get("status") or {})
        conditions = set_condition(
            status.conditions, reasons.FAILED, True, error.reason, message, utcnow(), meta.get("generation")
        )
        patch = {"conditions": [c.model_dump(mode="json", by_alias=True) for c in conditions],
                 "stage": "Failed", "observedGeneration": meta.get("generation")}
        self.runs_api.patch_status(meta.get("namespace") or "default", meta["name"], patch)
        self.post_event(body, "Warning", error.reason, message)

    def _record_metrics(self, before: RunStatus, plan: Plan) -> None:
        for action in plan.actions:
            if isinstance(action, Submit):
                stage = action.request.stage.kind
                metrics.JOB_SUBMISSIONS.labels(stage).inc()
                if action.request.attempt > 0:
                    metrics.JOB_RETRIES.labels(stage).inc()
        previous = {j.name: j.state for j in before.jobs}
        for job in plan.status.jobs:
            if job.state == "Failed" and previous.get(job.name) != "Failed":
                metrics.JOB_FAILURES.labels(job.stage).inc()
            if job.state == "Succeeded" and previous.get(job.name) in ACTIVE_STATES:
                first = min(
                    (j.submitted_at for j in plan.status.jobs
                     if j.stage == job.stage and j.generation == job.generation and j.submitted_at),
                    default=None,
                )
                if first and job.finished_at:
                    metrics.STAGE_SECONDS.labels(job.stage).observe((job.finished_at - first).total_seconds())
        condition = next(
            (t for t in (reasons.FAILED, reasons.SUCCEEDED, reasons.SUSPENDED, reasons.PROGRESSING)
             if is_true(plan.status.conditions, t)),
            "Unknown",
        )
        key = f"{plan.status.artifacts}"
        old = self._conditions.get(key)
        if old != condition:
            if old is not None:
                metrics.RUNS.labels(old).dec()
            metrics.RUNS.labels(condition).inc()
            self._conditions[key] = condition

    def job_ended(self, namespace: str, name: str) -> None:
        """A job of the run was seen ending: the next pass that submits a stage's first attempt
        measures the handoff (`noisy_student_handoff_seconds`) from now."""
        self._ended.setdefault(f"{namespace}/{name}", time.monotonic())

    def job_changed(self, event_type: str | None, job: dict[str, Any]) -> bool:
        """A Volcano Job of a run, from the watch stream: backends that observe through it keep it.
        False when every backend that keeps it says a pass would read nothing new of it."""
        records = [record for backend in self.backends.values()
                   if (record := getattr(backend, "job_changed", None)) is not None]
        if not records:
            return True
        return any([record(event_type, job) is not False for record in records])  # a list: each one records

    def on_explained(self, callback: Callable[[str, str], None]) -> None:
        """Call `callback(namespace, run)` when a backend learns why a job of the run waits (on
        its explainer's thread), so that the run's status says so on a pass at once."""
        for backend in self.backends.values():
            hook = getattr(backend, "on_explained", None)
            if hook is not None:
                hook(callback)

    def cancel_all(self, body: dict[str, Any]) -> list[str]:
        """Cancel the run's running jobs (the run is being deleted)."""
        try:
            run = self._ref(body)
        except InvalidRun:
            return []
        if self._scheduler(run.spec) not in self.reconcilers:
            return []  # refused: it never had jobs
        context = self._context(body, run.spec)
        reconciler = self.reconcilers[self._scheduler(run.spec)]
        with self._locks[f"{run.namespace}/{run.name}"]:
            cancelled = reconciler.cancel_all(run, context)
        self._written_over.pop(f"{run.namespace}/{run.name}", None)
        self._ended.pop(f"{run.namespace}/{run.name}", None)
        key = f"{run.status.artifacts}"
        old = self._conditions.pop(key, None)
        if old is not None:
            metrics.RUNS.labels(old).dec()
        return cancelled
