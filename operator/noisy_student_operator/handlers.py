"""All kopf handlers of the operator. Each one is thin: it calls `RunController`.

Level-based: a timer re-observes every run; create, resume and spec-update
events and Volcano Job phase changes are only hints that make the next pass
come sooner. A pass reads the run fresh from the API, observes, plans, acts,
and writes the full status. Nothing in a pass sleeps. A failed pass reports
its error in the run's status (see `RunController`) and the timer looks again:
handlers never raise for it, so kopf posts no error Event every few seconds.
A plan's `requeue_after` (a retry's backoff) is honoured to the second by a
one-shot timer per run (`Requeuer`).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Callable
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
ANNOTATION_PREFIX = GROUP

_controller: RunController | None = None
_hints: Requeuer


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
    """One pending one-shot timer per run: `schedule` replaces the run's earlier one.

    The timer runs its pass in a copy of the caller's context (a kopf handler's), so that
    the pass can post Events (`kopf.event` reads kopf's settings from a context variable).
    """

    def __init__(self, callback: Callable[[str, str], None]) -> None:
        self.callback = callback
        self._timers: dict[tuple[str, str], threading.Timer] = {}
        self._lock = threading.Lock()

    def _timer(self, key: tuple[str, str], seconds: float) -> threading.Timer:
        timer = threading.Timer(max(seconds, 0.0), contextvars.copy_context().run, args=(self._fire, *key))
        timer.daemon = True
        return timer

    def schedule(self, namespace: str, name: str, seconds: float) -> None:
        key = (namespace, name)
        timer = self._timer(key, seconds)
        with self._lock:
            previous = self._timers.pop(key, None)
            if previous is not None:
                previous.cancel()
            self._timers[key] = timer
        timer.start()

    def hint(self, namespace: str, name: str, seconds: float) -> None:
        """Like `schedule`, but a pass already pending for the run is kept: hints never postpone."""
        key = (namespace, name)
        with self._lock:
            if key in self._timers:
                return
            timer = self._timer(key, seconds)
            self._timers[key] = timer
        timer.start()

    def _fire(self, namespace: str, name: str) -> None:
        with self._lock:
            self._timers.pop((namespace, name), None)
        self.callback(namespace, name)


def reconcile(namespace: str, name: str) -> None:
    try:
        controller().reconcile(namespace, name)
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
    settings.execution.max_workers = 20
    # The Volcano Job watch is cluster-wide: filter it on the server, or every team's Jobs stream
    # in (a handler's `labels=` only filters after they arrived).
    settings.watching.label_selectors[VOLCANO_JOBS] = JOB_SELECTOR


def on_run_changed(namespace: str, name: str, **_: Any) -> None:
    reconcile(namespace, name)


def unsettled(body: Any, **_: Any) -> bool:
    """Resume and timer filter: a finished, unchanged run costs nothing (no timer, no pass, no
    marker read, no request) at operator start or after; a spec change wakes it (update handler)."""
    return not controller().settled(body)


def on_timer(namespace: str, name: str, body: Any, **_: Any) -> None:
    if controller().idle(body):  # only finished jobs whose removal is not due yet
        return
    reconcile(namespace, name)


def on_run_deleted(namespace: str, name: str, body: Any, **_: Any) -> None:
    cancelled = controller().cancel_all(body)
    if cancelled:
        log.info("run %s/%s deleted; cancelled %s", namespace, name, ", ".join(cancelled))


def on_job_event(namespace: str, labels: dict[str, str], type: str | None, **_: Any) -> None:
    """A Volcano Job of a run changed: look at its run soon instead of at the next tick.

    Debounced per run: changes arriving while a hint is pending join it."""
    run = labels.get(LABEL_RUN)
    if run and type in ("MODIFIED", "DELETED"):
        _hints.hint(namespace, run, HINT_DELAY)


def _hinted_pass(namespace: str, name: str) -> None:
    try:
        controller().reconcile(namespace, name)
    except Exception:  # the timer retries; a hint must not fail
        log.debug("hint reconcile of %s/%s failed", namespace, name, exc_info=True)


def register(run_controller: RunController, interval: float = 10.0, watch_jobs: bool = True) -> None:
    """Install the handlers in kopf's default registry."""
    global _controller
    _controller = run_controller
    run_controller.post_event = _event
    run_controller.requeue = Requeuer(reconcile).schedule
    global _hints
    _hints = Requeuer(_hinted_pass)
    resource = dict(group=GROUP, version=VERSION, plural=PLURAL)
    kopf.on.startup()(on_startup)
    kopf.on.resume(**resource, when=unsettled)(on_run_changed)
    kopf.on.create(**resource)(on_run_changed)
    kopf.on.update(**resource, field="spec")(on_run_changed)
    kopf.timer(**resource, interval=interval, initial_delay=interval, when=unsettled)(on_timer)
    kopf.on.delete(**resource)(on_run_deleted)
    if watch_jobs:
        kopf.on.event(
            "batch.volcano.sh", "v1alpha1", "jobs",
            labels={"app.kubernetes.io/managed-by": MANAGED_BY},
        )(on_job_event)

