"""All kopf handlers of the operator. Each one is thin: it calls `RunController`.

Level-based: a timer re-observes every run; create, resume and spec-update
events and Volcano Job phase changes are only hints that make the next pass
come sooner. A pass reads the run fresh from the API, observes, plans, acts,
and writes the full status. Nothing in a pass sleeps. A failed pass reports
its error in the run's status (see `RunController`) and the timer looks again:
handlers never raise for it, so kopf posts no error Event every few seconds.
A plan's `requeue_after` (a retry's backoff) is honoured to the second, and
Job changes are debounced per run, by `Requeuer`: one scheduler thread each.
Requeued passes run on kopf's worker pool; hinted passes, the ones the next
stage waits for, on a pool of their own, and the Job events that bring them
are handled on kopf's event loop: neither ever waits behind the timer passes
queued for kopf's workers (about a timer interval's worth at 1,000 runs). A
run that is finished and unchanged gets no resume pass, no timer, and a Job
hint about it reads only the run.
"""

from __future__ import annotations

import contextvars
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import kopf

from .api import GROUP, PLURAL, VERSION
from .backend import LABEL_RUN, MANAGED_BY
from .controller import InvalidRun, RunController

log = logging.getLogger(__name__)

FINALIZER = f"{GROUP}/finalizer"
VOLCANO_JOBS = ("batch.volcano.sh", "v1alpha1", "jobs")
JOB_SELECTOR = f"app.kubernetes.io/managed-by={MANAGED_BY}"
#: Seconds a Volcano Job change waits, so a burst of changes (pods starting, one per shard) is one pass.
HINT_DELAY = 0.5
#: Phases that end a Job (see volcano.PHASES): the next stage waits on them, so their pass is not delayed.
FINAL_PHASES = frozenset({"Completed", "Failed", "Terminated", "Aborted"})
ANNOTATION_PREFIX = GROUP
#: kopf's sync-handler workers (timers, creates, updates); requeued passes run on the same pool.
MAX_WORKERS = 20
#: Workers of the hinted passes (a Job ended or changed phase): a lane of their own.
HINT_WORKERS = 8

_controller: RunController | None = None


def controller() -> RunController:
    if _controller is None:
        raise RuntimeError("the operator is not configured: call handlers.register() first")
    return _controller


def _event(body: Any, type_: str, reason: str, message: str) -> None:
    try:
        kopf.event(body, type=type_, reason=reason, message=message)
    except LookupError:  # outside kopf's context (no event queue): never fail the pass for it
        log.warning("could not post Event %s: %s", reason, message)


class Requeuer:
    """One pending one-shot pass per run: `schedule` replaces the run's earlier one, `hint` joins it.

    One scheduler thread keeps every run's due time; a due pass runs on `executor` (kopf's
    pool of sync-handler workers, `settings.execution.executor`, handed over at startup), so
    requeued and hinted passes count against kopf's worker limit, never a thread per run.
    The pass runs in a copy of the caller's context (a kopf handler's), so that it can post
    Events (`kopf.event` reads kopf's settings from a context variable).
    """

    def __init__(self, callback: Callable[[str, str], None], executor: Executor | None = None) -> None:
        self.callback = callback
        self.executor = executor
        #: run → (its heap entry, due time, the context to run it in)
        self._pending: dict[tuple[str, str], tuple[int, float, contextvars.Context]] = {}
        self._due: list[tuple[float, int, tuple[str, str]]] = []  # heap of (monotonic due time, entry, run)
        self._entries = itertools.count()
        self._changed = threading.Condition()
        self._scheduler: threading.Thread | None = None

    def schedule(self, namespace: str, name: str, seconds: float) -> None:
        self._put((namespace, name), seconds, replace=True)

    def hint(self, namespace: str, name: str, seconds: float) -> None:
        """Like `schedule`, but hints never postpone: a pass already pending for the run is kept,
        only brought forward when this hint is due earlier."""
        self._put((namespace, name), seconds, replace=False)

    def pending(self) -> int:
        with self._changed:
            return len(self._pending)

    def _put(self, key: tuple[str, str], seconds: float, replace: bool) -> None:
        with self._changed:
            due = time.monotonic() + max(seconds, 0.0)
            if key in self._pending and not replace and self._pending[key][1] <= due:
                return
            entry = next(self._entries)
            self._pending[key] = (entry, due, contextvars.copy_context())
            heapq.heappush(self._due, (due, entry, key))
            if len(self._due) > 2 * len(self._pending) + 64:  # replaced entries: drop them now
                self._due = [item for item in self._due if self._pending.get(item[2], (None,))[0] == item[1]]
                heapq.heapify(self._due)
            if self._scheduler is None:
                self._scheduler = threading.Thread(target=self._loop, name="requeuer", daemon=True)
                self._scheduler.start()
            self._changed.notify()

    def _next_due(self) -> tuple[tuple[str, str], contextvars.Context]:
        """Wait for the earliest pending pass to be due; take it out."""
        with self._changed:
            while True:
                while self._due and self._pending.get(self._due[0][2], (None,))[0] != self._due[0][1]:
                    heapq.heappop(self._due)  # replaced by a later schedule
                if not self._due:
                    self._changed.wait()
                    continue
                delay = self._due[0][0] - time.monotonic()
                if delay <= 0:
                    _, _, key = heapq.heappop(self._due)
                    return key, self._pending.pop(key)[2]
                self._changed.wait(delay)

    def _loop(self) -> None:
        while True:
            key, context = self._next_due()
            if self.executor is None:  # before kopf's startup handed its pool over
                self.executor = _fallback_executor()
            self.executor.submit(context.run, self._fire, *key)

    def _fire(self, namespace: str, name: str) -> None:
        try:
            self.callback(namespace, name)
        except Exception:  # a requeued pass must not fail silently inside a pool's future
            log.warning("pass of %s/%s failed", namespace, name, exc_info=True)


def _fallback_executor() -> Executor:
    return ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="requeuer")


def reconcile(namespace: str, name: str, body: Any = None) -> None:
    try:
        controller().reconcile(namespace, name, body=body)
    except InvalidRun as error:
        raise kopf.PermanentError(str(error)) from error
    except Exception:  # reading the run itself failed: the timer looks again
        log.warning("reconcile of %s/%s failed", namespace, name, exc_info=True)


def on_startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    # Keep kopf's bookkeeping in our own annotations, never in status or spec.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # Events come from the controller, not from logs
    settings.watching.server_timeout = 300
    settings.execution.max_workers = MAX_WORKERS
    _requeues.executor = settings.execution.executor
    _hints.executor = ThreadPoolExecutor(max_workers=HINT_WORKERS, thread_name_prefix="hints")
    # The Volcano Job watch is cluster-wide: filter it on the server, or every team's Jobs stream
    # in (a handler's `labels=` only filters after they arrived).
    settings.watching.label_selectors[VOLCANO_JOBS] = JOB_SELECTOR


def on_run_changed(namespace: str, name: str, **_: Any) -> None:
    reconcile(namespace, name)


def unsettled(body: Any, **_: Any) -> bool:
    """Resume filter: a finished, unchanged run costs nothing (no pass, no marker read, no request)
    at operator start; a spec change wakes it (update handler)."""
    return not controller().settled(body)


def busy(body: Any, **_: Any) -> bool:
    """Timer filter: no timer for a run with nothing to do now (settled, or finished with only
    its jobs' removals ahead, which are requeued to the second); kopf stops a timer whose
    filter stops matching and starts it again when a change makes it match."""
    return not controller().idle(body)


def on_resume(namespace: str, name: str, body: Any, **_: Any) -> None:
    """At operator start: a finished run that only waits to remove its jobs gets that pass
    requeued at the due time, from the body kopf listed (no request, no marker read)."""
    due = controller().removal_due_in(body)
    if due is not None:
        _requeues.schedule(namespace, name, due)
        return
    reconcile(namespace, name)


def on_timer(namespace: str, name: str, body: Any, **_: Any) -> None:
    if controller().idle(body):  # became idle since kopf last matched the filter
        return
    reconcile(namespace, name, body)  # kopf's body, fresh from the watch stream: no GET


def on_run_deleted(namespace: str, name: str, body: Any, **_: Any) -> None:
    cancelled = controller().cancel_all(body)
    if cancelled:
        log.info("run %s/%s deleted; cancelled %s", namespace, name, ", ".join(cancelled))


async def on_run_event(event: dict[str, Any], **_: Any) -> None:
    """Every event of a run, before kopf keeps its body for the run's timer (the latest body of
    each run: a thousand at a thousand runs): drop the field managers' bookkeeping from it,
    `metadata.managedFields`, about a third of a run's JSON, which nothing here reads. The
    metadata is replaced, not shrunk in place: a pass may be copying the previous body in a
    worker thread. Asynchronous: kopf runs it on its event loop as the event arrives."""
    obj = event.get("object") or {}
    metadata = obj.get("metadata") or {}
    if "managedFields" in metadata:
        obj["metadata"] = {key: value for key, value in metadata.items() if key != "managedFields"}


async def on_job_event(
    namespace: str, labels: dict[str, str], type: str | None, status: Any, body: Any = None, **_: Any
) -> None:
    """A Volcano Job of a run changed: passes observe it from here (no GET), and its run is
    looked at soon instead of at the next tick, when what a pass reads of the Job changed
    (its phase, not the pod counts Volcano rewrites as each of its pods starts).

    Debounced per run: changes arriving while a hint is pending join it. A Job that ended
    (or is gone) is looked at at once: the next stage's submission waits on that pass.
    Asynchronous, so kopf runs it on its event loop (it only records and schedules: no
    request, no wait) rather than queueing it for a worker behind timer passes."""
    changed = controller().job_changed(type, body) if body is not None else True
    run = labels.get(LABEL_RUN)
    if run and type in ("MODIFIED", "DELETED") and changed:
        phase = ((status or {}).get("state") or {}).get("phase")
        final = type == "DELETED" or phase in FINAL_PHASES
        if final:
            controller().job_ended(namespace, run)
        _hints.hint(namespace, run, 0.0 if final else HINT_DELAY)


def _hinted_pass(namespace: str, name: str) -> None:
    try:  # a finished run's Job changing (deleted, say) is nothing to act on: no observe, no marker read
        controller().reconcile(namespace, name, unless_idle=True)
    except Exception:  # the timer retries; a hint must not fail
        log.debug("hint reconcile of %s/%s failed", namespace, name, exc_info=True)


#: A retry's requeue (the plan's `requeue_after`) and the debounced Job hints, one scheduler each.
_requeues = Requeuer(reconcile)
_hints = Requeuer(_hinted_pass)


def register(run_controller: RunController, interval: float = 10.0, watch_jobs: bool = True) -> None:
    """Install the handlers in kopf's default registry."""
    global _controller
    _controller = run_controller
    run_controller.post_event = _event
    run_controller.requeue = _requeues.schedule
    run_controller.on_explained(lambda namespace, run: _hints.hint(namespace, run, 0.0))
    resource = dict(group=GROUP, version=VERSION, plural=PLURAL)
    kopf.on.startup()(on_startup)
    kopf.on.resume(**resource, when=unsettled)(on_resume)
    kopf.on.create(**resource)(on_run_changed)
    kopf.on.update(**resource, field="spec")(on_run_changed)
    kopf.on.event(**resource)(on_run_event)
    kopf.timer(**resource, interval=interval, initial_delay=interval, when=busy)(on_timer)
    kopf.on.delete(**resource)(on_run_deleted)
    if watch_jobs:
        kopf.on.event(
            "batch.volcano.sh", "v1alpha1", "jobs",
            labels={"app.kubernetes.io/managed-by": MANAGED_BY},
        )(on_job_event)

