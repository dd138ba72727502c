"""The local runner: drive a run file on this machine with TorchX `local_cwd` jobs.

It is the second driver of the core (the kopf operator is the first): every
pass reads the completion markers and job states, plans, submits, and writes
the status next to the artifacts (`<prefix>/status.json`). A rerun after
Ctrl-C or a crash reads that status and the markers and resumes without
redoing completed stages; training resumes from its last epoch checkpoint::

    noisy-student run examples/quickstart.yaml
    noisy-student status examples/quickstart.yaml --output json
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from noisy_student_workloads.store import join_uri, open_store

from .api import NoisyStudentRun, RunSpec, RunStatus, validate_tolerant
from .backend import JobContext, TorchXJobBackend, default_local_root
from .core import reasons
from .core.conditions import get_condition, is_true
from .core.keys import workload_identity
from .core.layout import STUDENT, TEACHER, RunLayout, Stage, plan_stages
from .core.planner import LIVE_STATES, Plan, RunRef
from .lease import LeasedBackend
from .reconcile import Reconciler

log = logging.getLogger(__name__)

LOCAL_SCHEDULER = "local_cwd"
PLOT_FILE = "top1.png"
#: Longest wait, after Ctrl-C, for the cancelled jobs' processes to end (TorchX waits 10 s, then kills).
STOP_SECONDS = 30.0
SPEC_FILE = "spec.json"


def _termination_signals() -> tuple[type[BaseException], ...]:
    """TorchX's local scheduler turns SIGINT/SIGTERM into its own exception."""
    from torchx.schedulers.local_scheduler import SignalException

    return (SignalException,)


class RunFailed(RuntimeError):
    """The run ended Failed; the message names the stage and ends with its log."""


def with_artifacts(run: NoisyStudentRun, artifacts: str | None) -> NoisyStudentRun:
    """The run with `spec.artifacts.uri` replaced (`--artifacts`)."""
    if not artifacts:
        return run
    if "://" not in artifacts:
        artifacts = Path(artifacts).resolve().as_uri()
    spec = run.spec.model_copy(
        update={"artifacts": run.spec.artifacts.model_copy(update={"uri": artifacts})}
    )
    return run.model_copy(update={"spec": spec})


def local_root(layout: RunLayout) -> Path:
    """Where local_cwd jobs get their working directory and logs."""
    if layout.prefix.startswith("file://"):
        return Path(layout.prefix.removeprefix("file://")) / "local"
    return default_local_root() / layout.prefix.replace("://", "/")


class RunProgress:
    """One progress bar per stage; training stages count epochs (with images/s, ETA and top-1), labeling the
    fraction of its images (with images/s and ETA)."""

    def __init__(self, console: Console, run: NoisyStudentRun):
        self.progress = Progress(
            TextColumn("{task.description:<34}"),
            BarColumn(),
            TextColumn("{task.completed:.1f}/{task.total:.0f}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"),
            console=console,
        )
        self.spec = run.spec
        self.tasks: dict[Stage, Any] = {}

    def __enter__(self) -> RunProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def _label(self, stage: Stage) -> str:
        if stage.is_training:
            role = "teacher" if stage.kind == TEACHER else "student"
            return f"g{stage.generation} {role} ({self.spec.model_for(stage.generation)})"
        return f"g{stage.generation} {stage.kind}"

    def update(self, status: RunStatus, done: set[Stage]) -> None:
        for stage in plan_stages(self.spec):
            started = any(j.stage == stage.kind and j.generation == stage.generation for j in status.jobs)
            if stage not in done and not started:
                continue
            total = self.spec.epochs_for(stage.generation) if stage.is_training else 1
            if stage not in self.tasks:
                self.tasks[stage] = self.progress.add_task(self._label(stage), total=total, note="")
            task = self.tasks[stage]
            if stage in done:
                self.progress.update(task, completed=total, note="done")
                continue
            progress = status.progress
            if progress is None or (progress.stage, progress.generation) != (stage.kind, stage.generation):
                self.progress.update(task, completed=0, note="")
                continue
            # The same progress as `status.progress` (and `kubectl get nsr`): epochs (labeling: images),
            # images/s, ETA, top-1.
            note = [f"{progress.images:,}/{progress.images_total or '?'} images" if progress.images is not None else "",
                    f"{progress.images_per_second:.0f} img/s" if progress.images_per_second else "",
                    f"ETA {progress.eta}" if progress.eta else "",
                    f"top-1 {progress.top1:.3f}" if progress.top1 is not None else ""]
            completed = progress.epoch if progress.epoch is not None else (progress.percent or 0) / 100
            self.progress.update(task, completed=completed, note="  ".join(n for n in note if n))


class StatusFile:
    """The run's status, kept next to its artifacts (`<prefix>/status.json`)."""

    def __init__(self, run: NoisyStudentRun) -> None:
        self.workload = workload_identity(run.spec, LOCAL_SCHEDULER)
        self.layout = RunLayout.for_run(run.spec, run.metadata.namespace, run.metadata.name, self.workload)
        self.store = open_store(self.layout.prefix)

    def load(self) -> RunStatus:
        """The stored status; fields of a newer version are ignored, not an error."""
        if self.store.exists(self.layout.status_uri):
            status, ignored = validate_tolerant(RunStatus, self.store.get_json(self.layout.status_uri))
            if ignored:
                log.warning("%s: ignored fields this version does not know: %s",
                            self.layout.status_uri, ", ".join(ignored))
            return status
        return RunStatus()

    def save_manifest(self) -> None:
        """`<run>/stages.json`: the key and location of every stage of the current spec."""
        stages = [
            {"stage": stage.kind, "generation": stage.generation, "key": key,
             "uri": self.layout.stage_prefix(stage) + "/"}
            for stage, key in self.layout.keys.items()
        ]
        self.store.put_json(self.layout.manifest_uri, {"workload": self.workload, "stages": stages})

    def save(self, status: RunStatus) -> None:
        self.store.put_json(self.layout.status_uri, status.to_api())

    def spec_generation(self, run: NoisyStudentRun, record: bool = True) -> int:
        """The local stand-in for `metadata.generation`: it grows whenever the spec changes."""
        uri = join_uri(self.layout.prefix, SPEC_FILE)
        spec = run.spec.to_api()
        previous = self.store.get_json(uri) if self.store.exists(uri) else None
        if previous is not None and previous.get("spec") == spec:
            return int(previous["generation"])
        generation = int(previous["generation"]) + 1 if previous is not None else 1
        if record:
            self.store.put_json(uri, {"generation": generation, "spec": spec})
        return generation


class LocalRunner:
    """Drive one run to its end on this machine."""

    def __init__(
        self,
        run: NoisyStudentRun,
        console: Console | None = None,
        poll_seconds: float = 2.0,
        backend: Any = None,
    ) -> None:
        self.run = run
        self.console = console or Console(stderr=True)
        self.poll_seconds = poll_seconds
        self.status_file = StatusFile(run)
        self.layout = self.status_file.layout
        self.store = self.status_file.store
        self.backend = backend or LeasedBackend(TorchXJobBackend(LOCAL_SCHEDULER, local_root=local_root(self.layout)))
        self.reconciler = Reconciler(self.backend)
        self.context = JobContext(run=run.metadata.name, namespace=run.metadata.namespace)
        self.generation = self.status_file.spec_generation(run, record=False)

    def ref(self, status: RunStatus, spec: RunSpec | None = None) -> RunRef:
        meta = self.run.metadata
        return RunRef(meta.name, meta.namespace, spec or self.run.spec, status, self.generation,
                      self.status_file.workload)

    def _pass(self, status: RunStatus, spec: RunSpec | None = None) -> Plan:
        plan = self.reconciler.reconcile(self.ref(status, spec), self.context)
        if plan.status != status:
            self.status_file.save(plan.status)
        return plan

    def stop(self, status: RunStatus) -> RunStatus:
        """After Ctrl-C: the passes of the run suspended, until its cancelled jobs are confirmed stopped
        (their processes gone; at most `STOP_SECONDS`), so the status file never says a job runs."""
        suspended = self.run.spec.model_copy(update={"suspend": True})
        deadline = time.monotonic() + STOP_SECONDS
        while True:
            status = self._pass(status, suspended).status
            if not any(j.state in LIVE_STATES for j in status.jobs) or time.monotonic() > deadline:
                return status
            time.sleep(min(self.poll_seconds, 0.5))

    def execute(self) -> RunStatus:
        """Run until Succeeded, Failed or Suspended; returns the final status."""
        self.generation = self.status_file.spec_generation(self.run)
        self.status_file.save_manifest()
        status = self.status_file.load()
        if status.jobs:
            self.console.print(f"Resuming {self.run.metadata.name} from {self.layout.status_uri}")
        with RunProgress(self.console, self.run) as progress:
            try:
                while True:
                    plan = self._pass(status)
                    status = plan.status
                    self._report(plan)
                    done = set(self.reconciler.markers.read(self.ref(status)))
                    progress.update(status, done)
                    live = any(j.state in LIVE_STATES for j in status.jobs)
                    if plan.finished or (self.run.spec.suspend and not live):
                        break  # suspended: once its cancelled job is confirmed stopped
                    time.sleep(min(plan.requeue_after or self.poll_seconds, self.poll_seconds))
            except (KeyboardInterrupt, *_termination_signals()) as interrupt:
                live = [j.name for j in status.jobs if j.state in LIVE_STATES]
                status = self.stop(status)
                stopping = [j.name for j in status.jobs if j.state in LIVE_STATES]
                self.console.print(
                    f"Interrupted; cancelled {', '.join(live) or 'nothing'}"
                    + (f" (still stopping: {', '.join(stopping)})" if stopping else "")
                    + ". Run the same command again to resume."
                )
                raise KeyboardInterrupt from interrupt
        if is_true(status.conditions, reasons.SUCCEEDED):
            self.write_plot(status)
        if is_true(status.conditions, reasons.FAILED):
            raise RunFailed(self.failure_report(status))
        return status

    def _report(self, plan: Plan) -> None:
        for event in plan.events:
            style = "yellow" if event.type == "Warning" else "dim"
            self.console.print(f"[{style}]{event.reason}: {event.message}[/{style}]")

    def failure_report(self, status: RunStatus) -> str:
        failed = get_condition(status.conditions, reasons.FAILED)
        message = failed.message if failed else "the run failed"
        job = next((j for j in reversed(status.jobs) if j.state == "Failed"), None)
        tail = self.backend.log_tail(job) if job else None
        if tail:
            message += f"\n\nLast lines of the log of {job.name}:\n{tail}"
        return message

    def write_plot(self, status: RunStatus) -> str:
        """A PNG of top-1 per generation, stored next to the artifacts."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        generations = [g for g in status.generations if g.top1 is not None]
        figure, axes = plt.subplots(figsize=(5, 3.2), dpi=120)
        axes.plot([g.generation for g in generations], [g.top1 for g in generations], marker="o")
        for g in generations:
            axes.annotate(g.model, (g.generation, g.top1), textcoords="offset points", xytext=(0, 6),
                          ha="center", fontsize=7)
        axes.set_xlabel("generation (0 = teacher)")
        axes.set_ylabel("validation top-1")
        axes.set_xticks([g.generation for g in generations])
        axes.set_title(self.run.metadata.name)
        axes.grid(alpha=0.3)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        plt.close(figure)
        uri = join_uri(self.layout.prefix, PLOT_FILE)
        self.store.put_bytes(uri, buffer.getvalue())
        return uri


def render_table(status: RunStatus) -> Table:
    """Generation, model, parameters and top-1 of every trained model."""
    table = Table(title="Noisy Student generations")
    for column in ("generation", "role", "model", "parameters", "top-1", "top-5"):
        table.add_column(column, justify="right" if column not in ("role", "model") else "left")
    for g in status.generations:
        table.add_row(
            str(g.generation),
            "teacher" if g.generation == 0 else STUDENT,
            g.model,
            f"{g.parameters:,}" if g.parameters is not None else "-",
            f"{g.top1:.4f}" if g.top1 is not None else "-",
            f"{g.top5:.4f}" if g.top5 is not None else "-",
        )
    return table


def render_stages(status: RunStatus) -> Table:
    """Every stage of the current spec: its key, its state and the run that computed it."""
    table = Table(title="Stages")
    for column in ("generation", "stage", "key", "state", "computed by"):
        table.add_column(column, justify="right" if column == "generation" else "left")
    for s in status.stages:
        table.add_row(str(s.generation), s.stage, s.key, s.state, s.produced_by or "-")
    return table
