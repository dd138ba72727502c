"""One reconcile pass, shared by both drivers: observe → plan → act.

The kopf handlers and the local runner call `Reconciler.reconcile(run)`; it
reads completion markers from the artifact store, asks the job backend for
the state of active jobs, calls the pure planner, and carries out the plan
(submit or cancel). Writing the returned status is left to the driver.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from noisy_student_workloads.store import ArtifactStore, open_store

from .backend import JobBackend, JobContext
from .core.layout import Stage, plan_stages
from .core.planner import ACTIVE_STATES, Cancel, Observation, Plan, RunRef, Submit, plan_run

log = logging.getLogger(__name__)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class MarkerReader:
    """Reads completion markers; a marker never changes once written, so it is cached."""

    def __init__(self, store_for: Callable[[str], ArtifactStore] = open_store) -> None:
        self.store_for = store_for
        self._cache: dict[str, dict[str, Any]] = {}

    def read(self, run: RunRef) -> dict[Stage, Mapping[str, Any]]:
        """Markers of the completed prefix of the run's stages (each under its stage key)."""
        layout = run.layout
        store = self.store_for(layout.root)
        markers: dict[Stage, Mapping[str, Any]] = {}
        for stage in plan_stages(run.spec):
            uri = layout.marker_uri(stage)
            marker = self._cache.get(uri)
            if marker is None:
                if not store.exists(uri):
                    break
                marker = store.get_json(uri)
                self._cache[uri] = marker
            markers[stage] = marker
        return markers


class Reconciler:
    """Observe, plan and act for one run at a time."""

    def __init__(
        self,
        backend: JobBackend,
        markers: MarkerReader | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.backend = backend
        self.markers = markers or MarkerReader()
        self.clock = clock

    def observe(self, run: RunRef, context: JobContext) -> Observation:
        active = [j for j in run.status.jobs if j.state in ACTIVE_STATES]
        return Observation(
            now=self.clock(),
            jobs=self.backend.observe(active, context),
            markers=self.markers.read(run),
        )

    def reconcile(self, run: RunRef, context: JobContext) -> Plan:
        plan = plan_run(run, self.observe(run, context))
        self.act(plan, context)
        return plan

    def act(self, plan: Plan, context: JobContext) -> None:
        records = {job.name: job for job in plan.status.jobs}
        for action in plan.actions:
            if isinstance(action, Submit):
                handle = self.backend.submit(action.request, context)
                records[action.request.name].handle = handle
                log.info("submitted %s", action.request.name)
            elif isinstance(action, Cancel):
                self.backend.cancel(action.job, context)
                log.info("cancelled %s", action.job.name)

    def cancel_all(self, run: RunRef, context: JobContext) -> list[str]:
        """Cancel every job the run still has running (deletion, Ctrl-C)."""
        cancelled = []
        active = [j for j in run.status.jobs if j.state in ACTIVE_STATES]
        for job in active:
            self.backend.cancel(job, context)
            cancelled.append(job.name)
        return cancelled
