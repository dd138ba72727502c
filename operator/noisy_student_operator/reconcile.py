"""One reconcile pass, shared by both drivers: observe → plan → act.

The kopf handlers and the local runner call `Reconciler.reconcile(run)`; it
reads completion markers from the artifact store, asks the job backend for
the state of active jobs, calls the pure planner, and carries out the plan
(submit, cancel, or remove a finished job). A submission that fails never loses the pass: it is
recorded on its job (`record_submit_error`) and the run is planned again, so
the returned status says what happened (a refused job fails the run with the
server's message; a transient error waits for its retry). Writing the
returned status is left to the driver.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from datetime import datetime, timezone
from typing import Any

from noisy_student_workloads.store import ArtifactStore, open_store

from .backend import JobBackend, JobContext
from .core.layout import LABEL, PROGRESS_FILE, Stage, label_progress_file, plan_stages
from .core import reasons
from .core.planner import (
    ACTIVE_STATES,
    LIVE_STATES,
    Cancel,
    Event,
    JobSubmitError,
    Observation,
    Plan,
    Remove,
    RunRef,
    Submit,
    marker_summary,
    plan_run,
    record_submit_error,
)

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class ArtifactStoreError(RuntimeError):
    """The artifact store could not be read (no credentials, 403 without s3:ListBucket, unreachable)."""


#: Markers kept in memory (their `marker_summary`, under 1 KB each): the stages of thousands of runs.
MAX_CACHED_MARKERS = 20_000
#: Seconds the operator's passes show a running stage's progress as last read (see `Reconciler`).
PROGRESS_EVERY = 30.0
#: Running stages whose progress as last read is kept (a few hundred bytes each).
MAX_CACHED_PROGRESS = 4096


class MarkerReader:
    """Reads completion markers; a marker never changes once written, so what a pass reads of it
    (`marker_summary`) is cached.

    The cache is bounded (least recently used markers go first) and `forget`
    drops a deleted run's markers. With a `deadline`, a read that has taken
    longer gives up (`ArtifactStoreError`), so that one slow store holds a
    pass for seconds, not for botocore's minutes of retries.
    """

    def __init__(
        self,
        store_for: Callable[[str], ArtifactStore] = open_store,
        max_entries: int = MAX_CACHED_MARKERS,
        deadline: float | None = None,
    ) -> None:
        self.store_for = store_for
        self.max_entries = max_entries
        self.deadline = deadline
        self._cache: OrderedDict[str, Mapping[str, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def _cached(self, uri: str) -> Mapping[str, Any] | None:
        with self._lock:
            marker = self._cache.get(uri)
            if marker is not None:
                self._cache.move_to_end(uri)
            return marker

    def _remember(self, uri: str, marker: Mapping[str, Any]) -> None:
        with self._lock:
            self._cache[uri] = marker
            self._cache.move_to_end(uri)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)

    @property
    def cached(self) -> int:
        """Markers held in memory."""
        return len(self._cache)

    def read(self, run: RunRef, running: Collection[str] = ()) -> dict[Stage, Mapping[str, Any]]:
        """Markers of the completed prefix of the run's stages (each under its stage key).

        `running`: keys of stages whose job is seen running. Their markers are not read unless
        cached: a stage is not complete while its job runs (the marker is written last), and the
        job's end brings the pass that reads it. So a pass over a running stage costs no request.
        """
        layout = run.layout
        store = self.store_for(layout.root)
        markers: dict[Stage, Mapping[str, Any]] = {}
        started = time.monotonic()
        stages = plan_stages(run.spec)
        for stage in stages:
            if layout.key(stage) in running:
                marker = self._cached(layout.marker_uri(stage))
                if marker is None:
                    break
            else:
                marker = self._get(store, layout.marker_uri(stage), started)
            if marker is None:
                # The export (last) may follow a gap: the generations skipped by spec.stopWhenGainBelow.
                export = stages[-1]
                last = self._get(store, layout.marker_uri(export), started) if stage != export else None
                if last is not None:
                    markers[export] = last
                break
            markers[stage] = marker
        return markers

    def _get(self, store: ArtifactStore, uri: str, started: float) -> Mapping[str, Any] | None:
        marker = self._cached(uri)
        if marker is None:
            if self.deadline is not None and time.monotonic() - started > self.deadline:
                raise ArtifactStoreError(
                    f"the artifact store took more than {self.deadline:g} s for this pass; tried again later"
                )
            try:
                marker = marker_summary(store.get_json(uri))  # one GET, present or not
            except FileNotFoundError:
                return None
            self._remember(uri, marker)
        return marker

    def forget(self, run: RunRef) -> None:
        """Drop the run's markers (it was deleted; another run using a stage reads it again)."""
        with self._lock:
            for stage in plan_stages(run.spec):
                self._cache.pop(run.layout.marker_uri(stage), None)


class Reconciler:
    """Observe, plan and act for one run at a time.

    `progress_every`: seconds a running stage's progress as last read stands for a new read
    (None: every pass reads it). The operator's timer looks at every running run every
    `--interval` seconds, and at 1,000 runs its progress reads were most of the S3 server's
    requests; a stage's progress moves over minutes.
    """

    def __init__(
        self,
        backend: JobBackend,
        markers: MarkerReader | None = None,
        clock: Callable[[], datetime] = utcnow,
        progress_every: float | None = None,
    ) -> None:
        self.backend = backend
        self.markers = markers if markers is not None else MarkerReader()
        self.clock = clock
        self.progress_every = progress_every
        #: a running stage's progress URI → (when it was read, what was read: {} when nothing yet)
        self._progress: OrderedDict[str, tuple[datetime, dict[Stage, Mapping[str, Any]]]] = OrderedDict()
        self._progress_lock = threading.Lock()

    def observe(self, run: RunRef, context: JobContext) -> Observation:
        live = [j for j in run.status.jobs if j.state in LIVE_STATES]
        jobs = self.backend.observe(live, context)
        running = {j.key for j in live if j.key and j.name in jobs and jobs[j.name].state.active}
        try:
            markers = self.markers.read(run, running)
        except Exception as error:
            raise ArtifactStoreError(f"reading completion markers under {run.layout.root} failed: {error}") from error
        return Observation(now=self.clock(), jobs=jobs, markers=markers, progress=self.read_progress(run, markers))

    def read_progress(self, run: RunRef, markers: Mapping[Stage, Any]) -> dict[Stage, Mapping[str, Any]]:
        """What the training or label stage whose job runs wrote of its progress, if any (never fails the pass).

        Training: its `progress.json`; labeling: `{"replicas": [...]}`, each replica's `progress-RRRRR.json`
        (a GET per replica).
        """
        stage = next((s for s in plan_stages(run.spec) if s not in markers), None)
        if stage is None or not (stage.is_training or stage.kind == LABEL):
            return {}
        key = run.layout.key(stage)
        if not any(j.key == key and j.stage == stage.kind and j.state in ACTIVE_STATES for j in run.status.jobs):
            return {}
        uri = run.layout.stage_uri(stage, PROGRESS_FILE)
        if self.progress_every is None:
            return self._read_progress(run, stage, uri)
        now = self.clock()
        with self._progress_lock:
            last = self._progress.get(uri)
        if last is not None and (now - last[0]).total_seconds() < self.progress_every:
            return last[1]
        progress = self._read_progress(run, stage, uri)
        with self._progress_lock:
            self._progress[uri] = (now, progress)
            self._progress.move_to_end(uri)
            while len(self._progress) > MAX_CACHED_PROGRESS:
                self._progress.popitem(last=False)
        return progress

    def _read_progress(self, run: RunRef, stage: Stage, uri: str) -> dict[Stage, Mapping[str, Any]]:
        try:
            if stage.kind == LABEL:
                store = self.markers.store_for(run.layout.root)
                replicas = []
                for replica in range(run.spec.resources.label_shards):
                    try:
                        replicas.append(store.get_json(run.layout.stage_uri(stage, label_progress_file(replica))))
                    except FileNotFoundError:  # not started yet, or not written yet
                        continue
                return {stage: {"replicas": replicas}} if replicas else {}
            return {stage: self.markers.store_for(uri).get_json(uri)}
        except FileNotFoundError:  # not written yet: one GET, not a HEAD and a GET
            return {}
        except Exception as error:  # progress is a nicety: a pass never fails for it
            log.debug("cannot read the progress of %s: %s", stage.describe(), error)
            return {}

    def reconcile(self, run: RunRef, context: JobContext) -> Plan:
        observation = self.observe(run, context)
        plan = plan_run(run, observation)
        errors = self.act(plan, context)
        if not errors:
            return plan
        status = plan.status
        for name, error in errors.items():
            status = record_submit_error(run.spec, status, name, error, observation.now)
        # Planned again on what happened; its actions were this pass's already (nothing more is done).
        again = plan_run(dataclasses.replace(run, status=status), observation)
        done = [a for a in plan.actions if not (isinstance(a, Submit) and a.request.name in errors)]
        return Plan(again.status, done, plan.events + again.events, again.requeue_after)

    def act(self, plan: Plan, context: JobContext) -> dict[str, JobSubmitError]:
        """Carry out the plan; returns the submissions that failed, by job name."""
        records = {job.name: job for job in plan.status.jobs}
        errors: dict[str, JobSubmitError] = {}
        for action in plan.actions:
            if isinstance(action, Submit):
                name = action.request.name
                describe = action.request.stage.describe()
                try:
                    handle = self.backend.submit(action.request, context)
                except JobSubmitError as error:
                    errors[name] = error
                except Exception as error:  # unclassified (a connection error): may pass
                    errors[name] = JobSubmitError(f"{type(error).__name__}: {error}")
                else:
                    records[name].handle = handle
                    reason = reasons.JOB_RESUBMITTED if action.resubmit else reasons.JOB_SUBMITTED
                    plan.events.append(Event("Normal", reason, f"Submitted job {name} for {describe}."))
                    log.info("submitted %s", name)
                    continue
                error = errors[name]
                log.warning("submitting %s failed (%s): %s", name, error.reason, error)
                plan.events.append(Event("Warning", reasons.SUBMIT_ERROR, f"Submitting job {name} failed: {error}"))
            elif isinstance(action, Cancel):
                try:
                    self.backend.cancel(action.job, context)
                except Exception as error:  # still Cancelling: asked again next pass
                    log.warning("cancelling %s failed: %s", action.job.name, error)
                    records[action.job.name].message = f"cancel requested; the backend answered: {error}"
                else:
                    log.info("asked to cancel %s", action.job.name)
            elif isinstance(action, Remove):
                try:
                    self.backend.remove(action.job, context)
                except Exception as error:  # not removed: the next pass tries again
                    log.warning("removing finished job %s failed: %s", action.job.name, error)
                    if action.job.name in records:
                        records[action.job.name].removed_at = None
                else:
                    log.info("removed finished job %s", action.job.name)
        return errors

    def cancel_all(self, run: RunRef, context: JobContext) -> list[str]:
        """Cancel every job the run still has running (deletion, Ctrl-C); forget its markers."""
        self.markers.forget(run)
        cancelled = []
        live = [j for j in run.status.jobs if j.state in LIVE_STATES]
        for job in live:
            self.backend.cancel(job, context)
            cancelled.append(job.name)
        return cancelled
