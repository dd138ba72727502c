"""Stage leases: one job per stage key at a time on the local runner.

On a cluster, job names derive from the stage key, so the API server starts
one job however many runs ask for it. Local `local_cwd` jobs have no such
name service, so `LeasedBackend` holds a lease file under the stage's prefix
(`<root>/stages/<kind>/<key>/_LEASE.json`) while its job runs: created only if
absent (an atomic create on file:// and s3://), refreshed on every pass
(heartbeat), released when the job ends, and taken over when its holder is
gone (a dead process on this host, or no heartbeat for `ttl` seconds).

A second `noisy-student run` of the same file (or another run that needs the
same stage) finds the lease held and waits for the stage's marker instead of
starting a second copy::

    noisy-student run examples/quickstart.yaml &
    noisy-student run examples/quickstart.yaml    # waits, then reuses every stage
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from noisy_student_workloads.store import ArtifactStore, join_uri, open_store

from .api import JobStatus as JobRecord
from .backend import JobBackend, JobContext
from .core.layout import LEASE
from .core.planner import JobObservation, JobState
from .core.render import JobRequest

log = logging.getLogger(__name__)

#: Seconds without a heartbeat after which a lease may be taken over.
DEFAULT_TTL = 60.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LeasedBackend:
    """A `JobBackend` that runs a stage's job only while it holds the stage's lease."""

    def __init__(
        self,
        inner: JobBackend,
        store_for: Callable[[str], ArtifactStore] = open_store,
        ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.inner = inner
        self.store_for = store_for
        self.ttl = ttl
        self.clock = clock
        self.host = socket.gethostname()
        self.owner = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held: dict[str, str] = {}  # job name -> lease URI, while this process runs the job
        self.waiting: dict[str, str] = {}  # job name -> lease URI held by someone else

    # -- the lease file ------------------------------------------------------------

    def _document(self, job: str, run: str) -> bytes:
        return json.dumps(
            {"owner": self.owner, "host": self.host, "pid": os.getpid(), "job": job, "run": run,
             "heartbeat": self.clock()}, sort_keys=True).encode()

    def _read(self, uri: str) -> dict[str, Any] | None:
        store = self.store_for(uri)
        try:
            return json.loads(store.get_bytes(uri))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # a torn or foreign file: treated as stale

    def stale(self, lease: dict[str, Any]) -> bool:
        """Its holder is gone: a dead process on this host, or no heartbeat for `ttl` seconds."""
        if lease.get("host") == self.host and isinstance(lease.get("pid"), int) and not _pid_alive(lease["pid"]):
            return True
        heartbeat = lease.get("heartbeat")
        return not isinstance(heartbeat, (int, float)) or self.clock() - heartbeat > self.ttl

    def acquire(self, uri: str, job: str, run: str) -> dict[str, Any] | None:
        """Take the lease; returns None when taken, else the holder's lease."""
        store = self.store_for(uri)
        for _ in range(3):
            if store.create_bytes(uri, self._document(job, run)):
                return None
            holder = self._read(uri)
            if holder is None:
                continue  # released meanwhile
            if holder.get("owner") == self.owner:
                return None
            if not self.stale(holder):
                return holder
            log.warning("taking over the stale lease %s of %s", uri, holder.get("owner"))
            store.delete(uri)
        return self._read(uri) or {}

    def _heartbeat(self, uri: str, job: str, run: str) -> bool:
        """Refresh our lease; False when someone else holds it now (we lost it)."""
        holder = self._read(uri)
        if holder is None or holder.get("owner") != self.owner:
            return False
        self.store_for(uri).put_bytes(uri, self._document(job, run))
        return True

    def _release(self, name: str) -> None:
        uri = self.held.pop(name, None)
        if uri is not None:
            holder = self._read(uri)
            if holder is not None and holder.get("owner") == self.owner:
                self.store_for(uri).delete(uri)

    # -- JobBackend ------------------------------------------------------------------

    def submit(self, request: JobRequest, context: JobContext) -> str:
        uri = join_uri(request.prefix, LEASE)
        holder = self.acquire(uri, request.name, f"{context.namespace}/{context.run}")
        if holder is not None:
            self.waiting[request.name] = uri
            log.info("%s is running elsewhere (%s); waiting for it", request.name, holder.get("owner"))
            return f"lease://{holder.get('owner', 'unknown')}/{request.name}"
        self.waiting.pop(request.name, None)
        self.held[request.name] = uri
        try:
            return self.inner.submit(request, context)
        except BaseException:
            self._release(request.name)
            raise

    def observe(self, jobs: Sequence[JobRecord], context: JobContext) -> dict[str, JobObservation]:
        run = f"{context.namespace}/{context.run}"
        mine = [j for j in jobs if j.name in self.held]
        observed = dict(self.inner.observe(mine, context)) if mine else {}
        for job in mine:
            seen = observed[job.name]
            if not seen.state.active:
                self._release(job.name)  # ended (or unknown to the scheduler): the next holder may start
            elif not self._heartbeat(self.held[job.name], job.name, run):
                log.warning("lost the lease of %s to another runner; stopping this copy", job.name)
                self.inner.cancel(job, context)
                self.held.pop(job.name, None)
                observed[job.name] = JobObservation(JobState.MISSING)
        for job in jobs:
            if job.name in observed:
                continue
            uri = self.waiting.get(job.name)
            holder = self._read(uri) if uri else None
            if holder and holder.get("owner") != self.owner and not self.stale(holder):
                observed[job.name] = JobObservation(
                    JobState.RUNNING, f"running in {holder.get('run')} ({holder.get('owner')})")
            else:
                # Gone (done, failed or stale): the planner finds the marker or submits again.
                observed[job.name] = JobObservation(JobState.MISSING)
        return observed

    def cancel(self, job: JobRecord, context: JobContext) -> None:
        """Stop our copy; the lease is released once the job is observed ended (`observe`), so no
        other runner starts the stage while this copy's processes are still stopping."""
        self.waiting.pop(job.name, None)
        if job.name in self.held:
            self.inner.cancel(job, context)

    def remove(self, job: JobRecord, context: JobContext) -> None:
        self.inner.remove(job, context)

    def log_tail(self, job: JobRecord, lines: int = 40) -> str | None:
        return self.inner.log_tail(job, lines)
