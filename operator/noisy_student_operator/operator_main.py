"""Start the kopf operator: `noisy-student operator [--namespace NS ... | --all-namespaces]`.

The operator reads completion markers with its own S3 credentials (the
standard AWS environment of its Deployment) and never reads Secret objects.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .reconcile import MarkerReader

log = logging.getLogger(__name__)

#: The operator reads only small markers: its S3 calls fail fast (botocore's defaults retry for
#: minutes), and a pass stops reading after PASS_DEADLINE seconds, so that one slow store holds
#: its runs' passes for seconds and never stalls the other runs; the next pass tries again.
OPERATOR_S3 = {"max_attempts": 2, "connect_timeout": 2.0, "read_timeout": 5.0}
PASS_DEADLINE = 10.0


def marker_reader() -> MarkerReader:
    """The operator's MarkerReader: S3 with short timeouts, a per-pass deadline, a bounded cache."""
    from noisy_student_workloads.store import S3Store, open_store

    from .handlers import HINT_WORKERS, MAX_WORKERS
    from .reconcile import MarkerReader

    s3 = S3Store(**OPERATOR_S3, connections=MAX_WORKERS + HINT_WORKERS)  # a connection for each worker
    return MarkerReader(lambda uri: s3 if uri.startswith("s3://") else open_store(uri), deadline=PASS_DEADLINE)


def build_controller(scheduler_override: str | None = None):
    """A RunController wired to the real API server and TorchX backends."""
    from .backend import TorchXJobBackend
    from .controller import RunController
    from .kube import RunsApi, load_kube_config
    from .reconcile import PROGRESS_EVERY, Reconciler

    from .handlers import HINT_WORKERS, MAX_WORKERS

    load_kube_config(connections=MAX_WORKERS + HINT_WORKERS)  # a connection for each worker
    # Only `kubernetes` unless asked: `local_cwd` runs stages inside this process's pod, with its
    # S3 keys and ServiceAccount token, so a run author must not be able to choose it.
    names = [scheduler_override] if scheduler_override else ["kubernetes"]
    backends = {name: TorchXJobBackend(name) for name in names}
    return RunController(
        RunsApi(),
        backends,
        reconciler_for=lambda backend: Reconciler(backend, marker_reader(), progress_every=PROGRESS_EVERY),
        scheduler_override=scheduler_override,
    )


#: glibc's mallopt parameter for the number of malloc arenas (malloc.h).
M_ARENA_MAX = -8


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas, as `MALLOC_ARENA_MAX=2` does, before any thread starts.

    glibc gives threads that allocate at once arenas of their own, up to eight per core, and an
    arena keeps the memory its threads freed. The operator's 28 workers parse and copy runs all
    the time, so the arenas hold many copies' worth of freed memory. A `MALLOC_ARENA_MAX` in the
    environment wins. False when nothing changed (that variable is set, or the C library is not
    glibc)."""
    import ctypes
    import os

    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        return ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas) == 1
    except (AttributeError, OSError):
        return False


def run_operator(args: argparse.Namespace) -> int:
    import kopf

    from . import handlers, metrics

    limit_malloc_arenas()
    if not args.verbose:
        logging.getLogger().setLevel(logging.INFO)
        # kopf says at INFO that each handler call succeeded: at 1,000 runs, a hundred lines a
        # second written from its event loop (a quarter of its time). Its warnings and errors stay.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        # TorchX's runner says "tracker configurations: {}" at each submission; ours says what it submitted.
        logging.getLogger("torchx.runner.api").setLevel(logging.WARNING)
    controller = build_controller(args.scheduler)
    handlers.register(controller, interval=args.interval, watch_jobs=args.scheduler != "local_cwd")
    metrics.serve(args.metrics_port)
    clusterwide = args.all_namespaces or not args.namespace
    kopf.run(
        standalone=True,
        clusterwide=clusterwide,
        namespaces=() if clusterwide else args.namespace,
        liveness_endpoint=args.liveness or None,
    )
    return 0
