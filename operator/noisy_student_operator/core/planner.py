"""The planner: a pure function from what was observed to what to do next.

`plan_run(run, observation)` takes the run (spec and last status), the observed
job states and completion markers, and the current time; it returns a `Plan`:
the actions of this pass (submit or cancel jobs), Events to post, when to look
again, and the complete next status. It never performs I/O, so every driver —
the kopf operator, the local runner, tests, `--dry-run` — shares it.

Rules it follows:

* Every stage has a key (`keys`): a digest of what determines its outputs,
  which live under the key. A stage is complete when the marker under its
  key exists (the marker is the last thing a workload writes), whichever run
  made it; a job that succeeded without one has failed.
* A spec change changes the keys of exactly the stages it affects: those run,
  the rest are kept; jobs of keys the spec no longer has are cancelled.
* Job names derive from the key, so a job that the backend does not know is
  submitted again under the same name (create-if-absent), never twice, and
  two runs that need one stage share one job.
* A failed attempt is retried after `backoffSeconds * 2**failures` (capped),
  as a new attempt with its own name, until `retry.limit` failures; then the
  run is Failed with a condition naming the stage.
* A submission that fails is recorded on the job: a permanent error (the API
  server or an admission webhook refused the job) fails the run at once with
  the server's message; a transient one is retried with the same backoff.
* Events are posted on transitions only (a job's failure once, not every pass
  while the retry waits).
* A cancel counts as done when the backend confirms it: the job stays
  `Cancelling` (observed every pass, the cancel asked again) until the backend
  reports it gone or finished; no new attempt of its stage starts before.
* A finished job's object is deleted `spec.scheduler.ttlSecondsAfterFinished`
  after its end, by the first pass whose read status already records that end
  (never before its state is known); finished jobs are not observed again.
* `spec.suspend` cancels the running job and launches nothing; on resume the
  interrupted stage is submitted again as a new attempt (not counted as a
  failure) once the cancelled one has stopped.
* A Failed run stays Failed until its spec changes (`metadata.generation`);
  then the failed stage is tried again with a fresh retry budget.
* With `spec.stopWhenGainBelow`, once a student gains less top-1 than that
  over its teacher, the later generations' stages are Skipped (not failed)
  and the run goes on to its last stage, the export of the best model.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from ..api import GenerationStatus, JobStatus, ProgressStatus, RunSpec, RunStatus, StageStatus
from . import reasons
from .conditions import is_true, set_condition
from .layout import BALANCE, EXPORT, LABEL, STAGE_SUMMARY, STUDENT, RunLayout, Stage, plan_stages
from .render import JobRequest, render_job


class JobState(str, enum.Enum):
    """What a backend reports about a job."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"
    MISSING = "Missing"  # the backend has no job of that name

    @property
    def active(self) -> bool:
        return self in (JobState.PENDING, JobState.RUNNING)


ACTIVE_STATES = ("Pending", "Running")
#: Asked to stop; still counted as running until the backend confirms it is gone or finished.
CANCELLING = "Cancelling"
#: Jobs that may still have pods or processes: observed every pass.
LIVE_STATES = (*ACTIVE_STATES, CANCELLING)
#: A failed attempt that no longer counts against the retry limit (the spec changed since).
SUPERSEDED = "Superseded"
#: Ended: never observed again; their objects are deleted `ttlSecondsAfterFinished` after the end was recorded.
FINISHED_STATES = ("Succeeded", "Failed", "Cancelled", SUPERSEDED)


@dataclass(frozen=True)
class JobObservation:
    state: JobState
    message: str | None = None
    #: Why it failed, when the backend can tell: `reasons.DISRUPTED`, `reasons.INVALID_CONFIG`.
    reason: str | None = None


@dataclass(frozen=True)
class RunRef:
    """The run as the drivers see it."""

    name: str
    namespace: str
    spec: RunSpec
    status: RunStatus
    generation: int | None = None  # metadata.generation
    #: What runs the stages (see `keys.workload_identity`); by default from `spec.scheduler.name`.
    workload: str | None = None

    @functools.cached_property
    def layout(self) -> RunLayout:
        """Stage keys and locations; computed once per pass (observe and plan share them)."""
        return RunLayout.for_run(self.spec, self.namespace, self.name, self.workload)


@dataclass(frozen=True)
class Observation:
    """What a driver observed this pass."""

    now: datetime
    jobs: Mapping[str, JobObservation] = field(default_factory=dict)
    markers: Mapping[Stage, Mapping[str, Any]] = field(default_factory=dict)
    #: `progress.json` of the training stage that runs (written by the workload every few seconds).
    progress: Mapping[Stage, Mapping[str, Any]] = field(default_factory=dict)


class JobSubmitError(Exception):
    """A backend could not submit a job; `permanent` when trying again cannot help."""

    def __init__(self, message: str, reason: str = reasons.SUBMIT_FAILED, permanent: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.permanent = permanent


@dataclass(frozen=True)
class Submit:
    request: JobRequest
    resubmit: bool = False  # the same name again: the backend lost the job


@dataclass(frozen=True)
class Cancel:
    job: JobStatus


@dataclass(frozen=True)
class Remove:
    """Delete a finished job's object (its pods and Service go with it)."""

    job: JobStatus


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass
class Plan:
    """What to do this pass and the status to write afterwards."""

    status: RunStatus
    actions: list[Submit | Cancel | Remove] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None

    @property
    def finished(self) -> bool:
        return is_true(self.status.conditions, reasons.SUCCEEDED) or is_true(
            self.status.conditions, reasons.FAILED
        )

    def describe(self) -> str:
        lines = [f"stage: {self.status.stage} (generation {self.status.generation})"]
        for action in self.actions:
            if isinstance(action, Submit):
                lines.append(f"submit {action.request.name} ({action.request.component})")
            elif isinstance(action, Remove):
                lines.append(f"remove {action.job.name}")
            else:
                lines.append(f"cancel {action.job.name}")
        for event in self.events:
            lines.append(f"event {event.type} {event.reason}: {event.message}")
        if self.requeue_after is not None:
            lines.append(f"look again in {self.requeue_after:.0f}s")
        return "\n".join(lines)


def backoff_delay(spec: RunSpec, failures: int) -> float:
    """Delay before the retry that follows `failures` failed attempts (>= 1)."""
    retry = spec.retry
    return float(min(retry.backoff_seconds * 2 ** (failures - 1), retry.max_backoff_seconds))


def plan_stop(spec: RunSpec, generations: Mapping[int, GenerationStatus], generation: int) -> str | None:
    """Why the run stops after the student of `generation` (`spec.stopWhenGainBelow`); None to go on.

    The export workload applies the same rule to choose among the generations it exports from.
    """
    threshold = spec.stop_when_gain_below
    student, teacher = generations.get(generation), generations.get(generation - 1)
    if threshold is None or generation < 1 or generation >= len(spec.students) or not (student and teacher):
        return None
    if student.top1 is None or teacher.top1 is None:
        return None
    gain = student.top1 - teacher.top1
    if gain >= threshold:
        return None
    return (
        f"The student of generation {generation} gained {gain:+.4f} top-1 over its teacher "
        f"({teacher.top1:.4f} to {student.top1:.4f}), less than spec.stopWhenGainBelow ({threshold:g}); "
        + (f"generations {generation + 1} to {len(spec.students)} are skipped."
           if generation + 1 < len(spec.students) else f"generation {generation + 1} is skipped.")
    )


def duration(seconds: float) -> str:
    """`4m12s`, `1h05m`, `9s`: a compact duration for `kubectl get`."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def plan_progress(stage: Stage, progress: Mapping[str, Any] | None) -> ProgressStatus | None:
    """The status's progress of a running training or label stage, from what its workload wrote.

    Training: its `progress.json`. Labeling: `{"replicas": [...]}`, the `progress-RRRRR.json` of every replica
    that wrote one; images and rates are summed (a finished replica adds its images, not its rate).
    """
    if progress is None:
        return None
    if stage.kind == LABEL:
        return _label_progress(stage, progress.get("replicas") or [])
    if not stage.is_training:
        return None
    try:
        epoch, epochs = float(progress["epoch"]), int(progress["epochs"])
    except (KeyError, TypeError, ValueError):
        return None  # not written by this version's workload: no progress rather than a wrong one
    eta = progress.get("eta_seconds")
    return ProgressStatus(
        stage=stage.kind,
        generation=stage.generation,
        epoch=epoch,
        epochs=epochs,
        percent=int(100 * epoch / epochs) if epochs else 0,
        images_per_second=progress.get("images_per_second"),
        eta_seconds=eta,
        eta=duration(eta) if eta is not None else None,
        top1=progress.get("top1"),
        updated_at=progress.get("updated"),
    )


def _label_progress(stage: Stage, replicas: Sequence[Mapping[str, Any]]) -> ProgressStatus | None:
    try:
        images = sum(int(r["images"]) for r in replicas)
        rate = sum(float(r.get("images_per_second") or 0) for r in replicas if not r.get("done"))
        totals = {r.get("stage_images_total") for r in replicas}
    except (KeyError, TypeError, ValueError):
        return None  # not written by this version's workload
    if not replicas:
        return None
    total = next(iter(totals)) if len(totals) == 1 and None not in totals else None
    total = int(total) if total is not None else None
    eta = round((total - images) / rate) if total is not None and rate > 0 else None
    if total is not None and images >= total:
        eta = 0
    return ProgressStatus(
        stage=stage.kind,
        generation=stage.generation,
        images=images,
        images_total=total,
        percent=min(100, int(100 * images / total)) if total else None,
        images_per_second=round(rate, 1),
        eta_seconds=eta,
        eta=duration(eta) if eta is not None else None,
        updated_at=max(str(r.get("updated") or "") for r in replicas) or None,
    )


#: What planning reads of a completion marker (`marker_summary`): the stage's run, end and checkpoint,
#: and of its metrics the ones status shows.
MARKER_FIELDS = ("run", "finished", "checkpoint")
MARKER_METRICS = ("parameters", "top1", "top5", "images")


def marker_summary(marker: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a completion marker that a pass reads (`MARKER_FIELDS`, `MARKER_METRICS`).

    The operator caches markers (they never change) for thousands of runs' stages. A training
    stage's marker also holds what people read (every corruption's scores, the test split's, each
    output's sha256): 4-11 KB as Python objects, against under 1 KB for its summary.
    """
    summary = {k: marker[k] for k in MARKER_FIELDS if k in marker}
    metrics = marker.get("metrics")
    if isinstance(metrics, Mapping):
        summary["metrics"] = {k: metrics[k] for k in MARKER_METRICS if k in metrics}
    return summary


def _generation_from_marker(
    spec: RunSpec,
    layout: RunLayout,
    stage: Stage,
    marker: Mapping[str, Any],
    balance_marker: Mapping[str, Any] | None,
    now: datetime,
) -> GenerationStatus:
    metrics = marker.get("metrics") or {}
    images_used = (balance_marker or {}).get("metrics", {}).get("images")
    return GenerationStatus(
        generation=stage.generation,
        model=spec.model_for(stage.generation),
        key=layout.key(stage),
        parameters=metrics.get("parameters"),
        checkpoint=marker.get("checkpoint") or layout.checkpoint_uri(stage.generation),
        top1=metrics.get("top1"),
        top5=metrics.get("top5"),
        images_used=images_used,
        finished_at=marker.get("finished") or now,
    )


class _Pass:
    """State of one planning pass; `plan_run` is the public entry point."""

    def __init__(self, run: RunRef, observation: Observation) -> None:
        self.run = run
        self.spec = run.spec
        self.now = observation.now
        self.observation = observation
        self.layout = run.layout
        previous = run.status
        self.jobs = [job.model_copy() for job in previous.jobs]
        # Rebuilt from the markers of the current keys every pass: status describes the current spec.
        self.known = {g.key for g in previous.generations if g.key}
        self.reported = {s.key for s in previous.stages if s.state in ("Complete", "Reused")}
        self.generations: dict[int, GenerationStatus] = {}
        self.stages: dict[Stage, StageStatus] = {}
        self.stopped_after: int | None = None
        self.model: str | None = None
        self.progress: ProgressStatus | None = None
        self.conditions = list(previous.conditions)
        self.events: list[Event] = []
        self.actions: list[Submit | Cancel | Remove] = []
        self.requeue_after: float | None = None
        self.next_retry_at: datetime | None = None
        self.failed_now: set[str] = set()  # jobs that failed in this pass (their Event is posted once)
        self.failure_reason = reasons.STAGE_FAILED
        self.waiting: str | None = None  # why the current job has not started

    def retry_after_spec_change(self) -> None:
        """The spec changed after the run failed: earlier failures no longer count."""
        for job in self.jobs:
            if job.state == "Failed":
                job.state = SUPERSEDED
        self.event("Normal", reasons.SPEC_CHANGED, "The spec changed after the run failed; trying again.")

    # -- observe ---------------------------------------------------------------

    def refresh_jobs(self) -> None:
        """Fold observed job states into the job records."""
        for job in self.jobs:
            if job.state == CANCELLING:
                self.confirm_cancel(job)
                continue
            if job.state not in ACTIVE_STATES:
                continue
            seen = self.observation.jobs.get(job.name)
            if seen is None or seen.state is JobState.MISSING:
                continue
            if seen.state.active:
                job.state = seen.state.value
                if job.reason == reasons.SUBMIT_FAILED:  # the retried submission went through
                    job.reason = job.message = None
                if seen.state is JobState.PENDING and seen.message:
                    job.message = seen.message  # why it waits
                elif seen.state is JobState.RUNNING and job.message and job.reason is None:
                    job.message = None
                continue
            job.state = "Succeeded" if seen.state is JobState.SUCCEEDED else "Failed"
            job.finished_at = self.now
            if seen.state is JobState.CANCELLED:  # aborted by someone else: a disruption
                job.message = seen.message or "the job was aborted outside the operator"
                job.reason = reasons.DISRUPTED
            elif seen.state is JobState.FAILED:
                job.message = seen.message or "the job failed"
                job.reason = seen.reason
            if job.state == "Failed":
                self.failed_now.add(job.name)

    def confirm_cancel(self, job: JobStatus) -> None:
        """A cancelled job is Cancelled once the backend no longer runs it; until then, ask again."""
        seen = self.observation.jobs.get(job.name)
        if seen is None:
            return
        if seen.state is JobState.MISSING or not seen.state.active:
            job.state = "Cancelled"
            job.finished_at = self.now
            if seen.state is JobState.MISSING:
                job.removed_at = self.now  # gone already: nothing left to remove
            return
        self.actions.append(Cancel(job.model_copy()))

    def cancel(self, job: JobStatus, why: str) -> None:
        """Ask the backend to stop `job`; it stays `Cancelling` until the backend confirms."""
        self.actions.append(Cancel(job.model_copy()))
        job.state = CANCELLING
        job.message = f"cancelled because {why}"
        self.event("Normal", reasons.JOB_CANCELLED, f"Cancelling job {job.name}: {why}.")

    def records(self, stage: Stage) -> list[JobStatus]:
        key = self.layout.key(stage)
        return [j for j in self.jobs if j.key == key and j.stage == stage.kind]

    def report_spec_change(self) -> None:
        """After an edit, say which stages the new spec keeps and which it runs again."""
        previous = self.run.status
        if previous.observed_generation in (None, self.run.generation) or not previous.stages:
            return
        done = {(s.stage, s.key) for s in previous.stages if s.state in ("Complete", "Reused")}
        kept, rerun = [], []
        for stage, key in self.layout.keys.items():
            (kept if (stage.kind, key) in done else rerun).append(stage.describe())
        if not rerun:
            return
        message = f"The spec changed: {len(rerun)} stage(s) to run ({', '.join(rerun)})"
        message += f"; kept {', '.join(kept)}." if kept else "; nothing kept."
        self.event("Normal", reasons.SPEC_CHANGED, message)

    def cancel_orphans(self) -> None:
        """Cancel jobs of stages that the current spec no longer has (an edit, a removed student)."""
        current = {(stage.kind, key) for stage, key in self.layout.keys.items()}
        for job in self.jobs:
            if job.state in ACTIVE_STATES and (job.stage, job.key) not in current:
                self.cancel(job, "the spec no longer has this stage")

    def teacher_parameters(self, generation: int) -> int | None:
        teacher = self.generations.get(generation - 1)
        return teacher.parameters if teacher else None

    # -- decide ----------------------------------------------------------------

    def complete(self, stage: Stage, marker: Mapping[str, Any]) -> bool:
        """Record a completed stage; False while its job still runs."""
        records = self.records(stage)
        for job in records:
            seen = self.observation.jobs.get(job.name)
            if job.state in ACTIVE_STATES and seen is not None and seen.state.active:
                return False  # the marker is written last; the process is exiting
        for job in records:
            if job.state in ACTIVE_STATES:
                job.state = "Succeeded"
                job.finished_at = self.now
        key = self.layout.key(stage)
        produced_by = marker.get("run")
        # Shared when another run computed it (even in a job both runs waited for).
        reused = produced_by != f"{self.run.namespace}/{self.run.name}" if produced_by else not records
        self.stages[stage] = StageStatus(
            stage=stage.kind, generation=stage.generation, key=key,
            state="Reused" if reused else "Complete", produced_by=produced_by,
        )
        if reused and key not in self.reported:
            source = f"run {produced_by}" if produced_by else "an earlier run"
            self.event("Normal", reasons.STAGE_REUSED,
                       f"Reused {stage.describe()} (key {key}), computed by {source}.")
        if stage.is_training:
            balance = self.observation.markers.get(Stage(stage.generation, BALANCE))
            generation = _generation_from_marker(
                self.spec, self.layout, stage, marker, balance, self.now
            )
            self.generations[stage.generation] = generation
            if key in self.known or reused:
                return True
            if stage.kind == STUDENT:
                top1 = f"{generation.top1:.4f}" if generation.top1 is not None else "unknown"
                self.event(
                    "Normal",
                    reasons.PROMOTED,
                    f"Student of generation {stage.generation} ({generation.model}, top-1 {top1}) "
                    "is now the teacher.",
                )
            else:
                self.event("Normal", reasons.STAGE_COMPLETED, f"Completed {stage.describe()}.")
        return True

    def event(self, type_: str, reason: str, message: str) -> None:
        self.events.append(Event(type_, reason, message))

    def submit(self, stage: Stage, attempt: int, resubmit: bool = False) -> None:
        request = render_job(self.spec, self.layout, stage, attempt, self.teacher_parameters(stage.generation))
        name = request.name
        self.actions.append(Submit(request, resubmit))
        existing = next((j for j in self.jobs if j.name == name), None)
        if existing is None:
            self.jobs.append(
                JobStatus(
                    name=name,
                    stage=stage.kind,
                    generation=stage.generation,
                    key=request.key,
                    attempt=attempt,
                    state="Pending",
                    submitted_at=self.now,
                )
            )

    def overdue(self, job: JobStatus) -> tuple[str, str] | None:
        """(reason, why) when the job waited or ran past the spec's limits."""
        if job.submitted_at is None:
            return None
        age = (self.now - job.submitted_at).total_seconds()
        pending, deadline = self.spec.pending_timeout_seconds, self.spec.active_deadline_seconds
        if job.state == "Pending" and pending is not None and age > pending:
            waited = f"; it waits because {job.message}" if job.message else ""
            return reasons.PENDING_TIMEOUT, f"did not start within pendingTimeoutSeconds ({pending}s){waited}"
        if deadline is not None and age > deadline:
            return reasons.DEADLINE_EXCEEDED, f"ran longer than activeDeadlineSeconds ({deadline}s)"
        return None

    def wait_until(self, retry_at: datetime) -> None:
        self.next_retry_at = retry_at
        self.look_again(retry_at)

    def look_again(self, at: datetime) -> None:
        """Ask for a pass at `at` (the earliest of the pass's wishes)."""
        seconds = max((at - self.now).total_seconds(), 0.0)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)

    def remove_finished(self) -> None:
        """Delete finished jobs' objects `spec.scheduler.ttlSecondsAfterFinished` after their end.

        Only a job whose end the status read for this pass already records is removed: its
        state is never lost with its object, and a finished job is never observed again, so it is
        never resubmitted because it is gone. A job that ended in this pass waits for the next one.
        """
        ttl = timedelta(seconds=self.spec.scheduler.ttl_seconds_after_finished)
        recorded = {j.name for j in self.run.status.jobs if j.state in FINISHED_STATES}
        for job in self.jobs:
            if job.state not in FINISHED_STATES or job.removed_at is not None or job.finished_at is None:
                continue
            due = job.finished_at + ttl
            if job.name in recorded and due <= self.now:
                self.actions.append(Remove(job.model_copy()))
                job.removed_at = self.now
            else:
                self.look_again(due)

    def plan(self, stage_summary: str, generation: int) -> Plan:
        """This pass's plan, finished jobs' removals included."""
        self.remove_finished()
        return Plan(self.status(stage_summary, generation), self.actions, self.events, self.requeue_after)

    def drive(self, stage: Stage) -> str | None:
        """Act on the current stage; returns a failure message when the run has failed."""
        records = sorted(self.records(stage), key=lambda j: j.attempt)
        latest = records[-1] if records else None
        if self.spec.suspend:
            for job in records:
                if job.state in ACTIVE_STATES:
                    self.cancel(job, "the run was suspended")
            return None
        if any(job.state == CANCELLING for job in records):
            return None  # the next attempt waits until the cancelled one has stopped
        if latest is None:
            self.submit(stage, 0)
            return None
        if latest.state in ACTIVE_STATES:
            overdue = self.overdue(latest)
            if overdue is not None:
                reason, why = overdue
                self.cancel(latest, why)
                latest.reason = self.failure_reason = reason
                return f"Stage {stage.kind} of generation {stage.generation}: job {latest.name} {why}."
            if latest.state == "Pending" and latest.message and not latest.submit_failures:
                self.waiting = latest.message
            seen = self.observation.jobs.get(latest.name)
            unsubmitted = seen is None or seen.state is JobState.MISSING
            retry_at = self.run.status.next_retry_at
            if latest.submit_failures and unsubmitted and retry_at is not None and self.now < retry_at:
                self.wait_until(retry_at)  # the last submission failed; its backoff runs
            elif unsubmitted and (seen is not None or latest.submit_failures):
                self.submit(stage, latest.attempt, resubmit=True)
            return None
        if latest.state == "Succeeded":
            # Succeeded without a marker (the marker check came first): a failure.
            latest.state = "Failed"
            latest.message = "the job succeeded but wrote no completion marker"
            self.failed_now.add(latest.name)
        if latest.state in ("Cancelled", SUPERSEDED):
            self.submit(stage, latest.attempt + 1)
            return None
        failures = sum(1 for j in records if j.state == "Failed" and j.reason != reasons.DISRUPTED)
        if latest.finished_at is None:
            latest.finished_at = self.now
        message = latest.message or "the job failed"
        if latest.reason in reasons.PERMANENT_FAILURES:
            self.failure_reason = latest.reason
            if latest.reason == reasons.SUBMIT_REJECTED:
                return f"Stage {stage.kind} of generation {stage.generation} could not be submitted: {message}"
            return (f"Stage {stage.kind} of generation {stage.generation} failed and is not retried "
                    f"(its configuration is wrong): {message} (job {latest.name}).")
        if latest.reason == reasons.DISRUPTED:
            return self.retry_disruption(stage, records, latest, message)
        if failures > self.spec.retry.limit:
            return (
                f"Stage {stage.kind} of generation {stage.generation} failed after {failures} attempts: "
                f"{message} (job {latest.name})."
            )
        retry_at = latest.finished_at + timedelta(seconds=backoff_delay(self.spec, failures))
        if self.now >= retry_at:
            self.submit(stage, latest.attempt + 1)
            return None
        if latest.name in self.failed_now:
            self.event(
                "Warning",
                reasons.JOB_FAILED,
                f"Job {latest.name} failed: {message}; retry {failures} of "
                f"{self.spec.retry.limit} at {retry_at.isoformat()}.",
            )
        self.wait_until(retry_at)
        return None

    def retry_disruption(self, stage: Stage, records: list[JobStatus], latest: JobStatus, message: str) -> str | None:
        """Evicted, preempted, lost with a node, aborted outside: retried at once, on its own budget."""
        disruptions = sum(1 for j in records if j.state == "Failed" and j.reason == reasons.DISRUPTED)
        limit = self.spec.retry.disruption_limit
        if disruptions > limit:
            self.failure_reason = reasons.TOO_MANY_DISRUPTIONS
            return (f"Stage {stage.kind} of generation {stage.generation} was disrupted {disruptions} times "
                    f"(retry.disruptionLimit {limit}): {message} (job {latest.name}).")
        if latest.name in self.failed_now:
            self.event("Warning", reasons.JOB_DISRUPTED,
                       f"Job {latest.name} was disrupted: {message}; retrying ({disruptions} of {limit}).")
        self.submit(stage, latest.attempt + 1)
        return None

    # -- report ----------------------------------------------------------------

    def conditions_for(self, state: str, stage: Stage | None, detail: str) -> None:
        generation = self.run.generation
        now = self.now

        def put(type_: str, value: bool, reason: str, message: str) -> None:
            self.conditions = set_condition(
                self.conditions, type_, value, reason, message, now, generation
            )

        running = state == "Running"
        progress = (reasons.WAITING_FOR_RETRY if self.next_retry_at
                    else reasons.JOB_PENDING if self.waiting else reasons.STAGE_RUNNING)
        # Ready's reason is the most specific one: `kubectl get nsr` shows it (the Reason column).
        put(reasons.READY, state == "Succeeded",
            reasons.RUN_SUCCEEDED if state == "Succeeded" else progress if running
            else self.failure_reason if state == "Failed" else reasons.RUN_SUSPENDED, detail)
        put(reasons.PROGRESSING, running,
            progress if running
            else reasons.COMPLETED if state == "Succeeded"
            else reasons.RUN_FAILED if state == "Failed" else reasons.RUN_SUSPENDED, detail)
        put(reasons.SUCCEEDED, state == "Succeeded",
            reasons.RUN_SUCCEEDED if state == "Succeeded" else reasons.IN_PROGRESS, detail)
        put(reasons.FAILED, state == "Failed",
            self.failure_reason if state == "Failed" else reasons.NO_FAILURE,
            detail if state == "Failed" else "No stage has failed.")
        put(reasons.SUSPENDED, state == "Suspended",
            reasons.RUN_SUSPENDED if state == "Suspended" else reasons.NOT_SUSPENDED,
            detail if state == "Suspended" else "The run is not suspended.")

    def skipped(self, stage: Stage) -> bool:
        """A stage of a generation after the one the run stopped at (the export still runs)."""
        return self.stopped_after is not None and stage.generation > self.stopped_after and stage.kind != EXPORT

    def stage_statuses(self) -> list[StageStatus]:
        out = []
        for stage in plan_stages(self.spec):
            if stage in self.stages:
                out.append(self.stages[stage])
                continue
            if self.skipped(stage):
                out.append(StageStatus(stage=stage.kind, generation=stage.generation,
                                       key=self.layout.key(stage), state="Skipped"))
                continue
            active = any(j.state in ACTIVE_STATES for j in self.records(stage))
            out.append(StageStatus(stage=stage.kind, generation=stage.generation,
                                   key=self.layout.key(stage), state="Running" if active else "Pending"))
        return out

    def status(self, stage_summary: str, generation: int) -> RunStatus:
        generations = [self.generations[g] for g in sorted(self.generations)]
        teacher = generations[-1] if generations else None
        return RunStatus(
            observed_generation=self.run.generation,
            generation=generation,
            stage=stage_summary,
            teacher_top1=teacher.top1 if teacher else None,
            artifacts=self.layout.prefix + "/",
            model=self.model,
            stopped_after=self.stopped_after,
            progress=self.progress,
            next_retry_at=self.next_retry_at,
            jobs=self.jobs[-50:],
            generations=generations,
            stages=self.stage_statuses(),
            conditions=self.conditions,
        )


def record_submit_error(spec: RunSpec, status: RunStatus, name: str, error: JobSubmitError, now: datetime) -> RunStatus:
    """The status after the submission of job `name` failed (planned again with `plan_run`)."""
    status = status.model_copy(deep=True)
    job = next(j for j in status.jobs if j.name == name)
    job.reason = error.reason
    if error.permanent:
        job.state = "Failed"
        job.finished_at = now
        job.message = str(error)
        return status
    job.submit_failures += 1
    retry_at = now + timedelta(seconds=backoff_delay(spec, job.submit_failures))
    job.message = f"submitting failed: {error}; retrying at {retry_at.isoformat()}"
    status.next_retry_at = retry_at
    return status


def plan_run(run: RunRef, observation: Observation) -> Plan:
    """Decide this pass's actions and the next status of `run`."""
    work = _Pass(run, observation)
    if is_true(run.status.conditions, reasons.FAILED):
        if run.generation is None or run.status.observed_generation == run.generation:
            # A failed run stays failed until its spec changes (its cancels are still confirmed).
            work.refresh_jobs()
            work.remove_finished()
            update = {"observed_generation": run.generation, "jobs": work.jobs[-50:]}
            return Plan(run.status.model_copy(update=update), work.actions, requeue_after=work.requeue_after)
        work.retry_after_spec_change()
    work.refresh_jobs()
    work.report_spec_change()
    work.cancel_orphans()
    current: Stage | None = None
    stop_reason: str | None = None
    for stage in plan_stages(run.spec):
        if work.skipped(stage):
            continue
        marker = observation.markers.get(stage)
        if marker is not None and work.complete(stage, marker):
            if stage.kind == EXPORT:
                work.model = work.layout.model_uri(run.spec)
            elif stage.kind == STUDENT:
                stop_reason = plan_stop(run.spec, work.generations, stage.generation)
                if stop_reason is not None:
                    work.stopped_after = stage.generation
            continue
        current = stage
        break
    if stop_reason is not None and run.status.stopped_after is None:
        work.event("Normal", reasons.STOPPED_EARLY, stop_reason)

    if current is None:
        last = max(work.generations, default=0)
        detail = f"All {last} student generations are trained and the best model is exported."
        if stop_reason is not None:
            detail = f"Stopped after generation {last}. {stop_reason}"
        work.conditions_for("Succeeded", None, detail)
        if not is_true(run.status.conditions, reasons.SUCCEEDED):
            work.event("Normal", reasons.RUN_SUCCEEDED, f"The run has ended; the best model is {work.model}.")
        return work.plan("Succeeded", last)

    failure = work.drive(current)
    if failure is not None:
        work.conditions_for("Failed", current, failure)
        work.event("Warning", reasons.RUN_FAILED, failure)
        return work.plan("Failed", current.generation)
    if run.spec.suspend:
        work.conditions_for("Suspended", current, f"Suspended before {current.describe()}.")
        return work.plan("Suspended", current.generation)
    detail = f"Running {current.describe()}."
    if work.next_retry_at is not None:
        detail = f"Waiting to retry {current.describe()}."
    elif work.waiting is not None:
        detail = f"Waiting for the job of {current.describe()} to start: {work.waiting}."
    if any(j.state in ACTIVE_STATES for j in work.records(current)):
        work.progress = plan_progress(current, observation.progress.get(current))
    work.conditions_for("Running", current, detail)
    generation = max(work.generations, default=0) if current.kind == EXPORT else current.generation
    return work.plan(STAGE_SUMMARY[current.kind], generation)
