"""Start the kopf operator: `noisy-student operator [--namespace NS ... | --all-namespaces]`.

The operator reads completion markers with its own S3 credentials (the
standard AWS environment of its Deployment) and never reads Secret objects.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def build_controller(scheduler_override: str | None = None):
    """A RunController wired to the real API server and TorchX backends."""
    from .backend import TorchXJobBackend
    from .controller import RunController
    from .kube import RunsApi, load_kube_config

    load_kube_config()
    # Only `kubernetes` unless asked: `local_cwd` runs stages inside this process's pod, with its
    # S3 keys and ServiceAccount token, so a run author must not be able to choose it.
    names = [scheduler_override] if scheduler_override else ["kubernetes"]
    backends = {name: TorchXJobBackend(name) for name in names}
    return RunController(RunsApi(), backends, scheduler_override=scheduler_override)


def run_operator(args: argparse.Namespace) -> int:
    import kopf

    from . import handlers, metrics

    logging.getLogger().setLevel(logging.INFO)
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
