"""What every stage entry point shares: CLI, JSON progress events, outputs and the completion marker.

Progress goes to stderr as one JSON object per line (``{"event": "epoch",
...}``) so a driver can follow a job's log. The completion marker
``_DONE.json`` is written last, as one whole object, and names the stage,
its metrics, its outputs and their sha256 digests.

Example::

    python -c "from noisy_student_workloads.stage import sha256; print(sha256(b''))"
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .store import join_uri, open_store

log = logging.getLogger("noisy_student_workloads")

DONE = "_DONE.json"
#: The exit code of a stage whose configuration is wrong (its driver does not retry it).
CONFIG_ERROR_EXIT_CODE = 2
#: Where Kubernetes reads a container's termination message (the default `terminationMessagePath`).
TERMINATION_LOG = "/dev/termination-log"
#: How the reason of a configuration error starts, in the termination message and torchrun's error file.
CONFIG_ERROR_PREFIX = "ConfigError: "


def parse_args(description: str, argv: Sequence[str] | None = None, replicas: bool = False) -> argparse.Namespace:
    """``--config`` (inline JSON or URI), plus ``--replica-id/--num-replicas`` for sharded stages."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="the stage config: inline JSON or the URI of a JSON file")
    if replicas:
        parser.add_argument("--replica-id", type=int, default=0, help="this replica's index (0-based)")
        parser.add_argument("--num-replicas", type=int, default=1, help="number of replicas")
    return parser.parse_args(argv)


C = TypeVar("C")


def run_entry_point(
    description: str,
    config_type: type[C],
    body: Callable[[C, argparse.Namespace], None],
    argv: Sequence[str] | None = None,
    replicas: bool = False,
    quiet: bool = False,
) -> int:
    """Parse the command line and the config, run ``body``; a ``ConfigError`` exits 2 naming the field
    (see `report_config_error`)."""
    from .config import ConfigError, parse_config

    args = parse_args(description, argv, replicas=replicas)
    setup_logging(quiet=quiet)
    try:
        body(parse_config(args.config, config_type), args)
    except ConfigError as exc:
        event("error", message=str(exc))
        print(f"error: {exc}", file=sys.stderr)
        report_config_error(exc)
        return CONFIG_ERROR_EXIT_CODE
    return 0


def report_config_error(exc: Exception) -> None:
    """Say ``ConfigError: <message>`` (one line) where the driver looks, since the exit code may not reach it.

    torchrun's agent exits 1 whatever its worker's exit code, so a training
    stage's 2 is lost. The reason goes to the container's termination message
    (Kubernetes' `terminationMessagePath`, when the kubelet made the file: not
    on a workstation) and to torchrun's error file (``TORCHELASTIC_ERROR_FILE``,
    in the format of torch's `ErrorHandler`; torchrun's agent copies its first
    failed worker's file to its own, which TorchX's local scheduler reads).
    """
    reason = CONFIG_ERROR_PREFIX + " ".join(str(exc).split())
    if os.path.isfile(TERMINATION_LOG) and os.access(TERMINATION_LOG, os.W_OK):
        with open(TERMINATION_LOG, "w") as termination:
            termination.write(reason + "\n")
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        record = {"message": {"message": reason, "errorCode": CONFIG_ERROR_EXIT_CODE, "extraInfo": {
            "py_callstack": traceback.format_exc(), "timestamp": str(int(time.time()))}}}
        with open(error_file, "w") as file:
            json.dump(record, file)


def setup_logging(quiet: bool = False) -> None:
    """Log bare messages (JSON events) to stderr; ``quiet`` for non-zero ranks."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", force=True)
    log.setLevel(logging.WARNING if quiet else logging.INFO)


def event(name: str, **fields: Any) -> None:
    """Log one progress event as a JSON line."""
    log.info(json.dumps({"event": name, **fields}, sort_keys=False))


def sha256(data: bytes) -> str:
    """Hex sha256 digest."""
    return hashlib.sha256(data).hexdigest()


def now() -> str:
    """UTC timestamp, ISO 8601 with seconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def put(uri: str, data: bytes, digests: dict[str, str] | None = None) -> str:
    """Write ``data`` to ``uri`` and record its digest in ``digests``; returns ``uri``."""
    open_store(uri).put_bytes(uri, data)
    if digests is not None:
        digests[uri] = sha256(data)
    return uri


def put_json(uri: str, obj: Any, digests: dict[str, str] | None = None) -> str:
    """Write ``obj`` as indented, key-sorted JSON (see :func:`put`)."""
    return put(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), digests)


def write_done(
    output: str, stage: str, metrics: dict[str, Any], digests: dict[str, str], finished: str | None = None
) -> dict[str, Any]:
    """Write the completion marker ``<output>/_DONE.json`` — always the stage's last write."""
    marker = {
        "stage": stage,
        "metrics": metrics,
        "outputs": sorted(digests),
        "sha256": dict(sorted(digests.items())),
        "finished": finished or now(),
    }
    if os.environ.get("NSO_RUN"):
        marker["run"] = os.environ["NSO_RUN"]  # the run whose job made it (shown when another run reuses it)
    put_json(join_uri(output, DONE), marker)
    return marker


class ProgressFile:
    """``progress.json`` of a running stage, rewritten at most every ``every`` seconds (drivers put it in status).

    Fields: ``epoch`` (fractional, epochs done), ``epochs``, ``images_per_second``,
    ``eta_seconds`` (this stage), ``top1`` (latest validation top-1) and ``updated``.
    """

    def __init__(self, uri: str, epochs: int, start_epoch: int = 0, every: float = 5.0) -> None:
        self.uri = uri
        self.epochs = epochs
        self.every = every
        self.start_epoch = start_epoch
        self.started = time.monotonic()
        self.last = float("-inf")
        self.top1: float | None = None

    def due(self, force: bool) -> bool:
        """Whether to write now (the last write is ``every`` seconds old, or ``force``); marks it written."""
        clock = time.monotonic()
        if not force and clock - self.last < self.every:
            return False
        self.last = clock
        return True

    def update(self, epoch: float, images_per_second: float, top1: float | None = None, force: bool = False) -> bool:
        """Write unless the last write is younger than ``every`` seconds (``force``: always); True if written."""
        if top1 is not None:
            self.top1 = top1
        if not self.due(force):
            return False
        done = epoch - self.start_epoch
        elapsed = self.last - self.started
        eta = elapsed * (self.epochs - epoch) / done if done > 0 else None
        put_json(self.uri, {
            "epoch": round(epoch, 3), "epochs": self.epochs, "images_per_second": round(images_per_second, 1),
            "eta_seconds": None if eta is None else round(eta), "top1": self.top1, "updated": now(),
        })
        return True


class ImageProgress(ProgressFile):
    """A label replica's ``progress-RRRRR.json``, rewritten at most every ``every`` seconds: ``images`` done of
    ``images_total`` (this replica's; None when the shards' packing marker does not count them),
    ``stage_images_total`` (all replicas'), ``images_per_second``, ``eta_seconds``, ``done`` and ``updated``.
    Drivers sum the replicas' files into the run's progress."""

    def __init__(self, uri: str, total: int | None, stage_total: int | None, every: float = 5.0) -> None:
        super().__init__(uri, 0, every=every)
        self.total, self.stage_total = total, stage_total

    def update_images(self, images: int, done: bool = False) -> bool:
        """Write ``images`` done (``done``: the replica has finished; always written)."""
        if not self.due(done):
            return False
        elapsed = self.last - self.started
        rate = images / elapsed if elapsed > 0 else 0.0
        eta = (self.total - images) / rate if self.total is not None and rate > 0 else None
        put_json(self.uri, {
            "images": images, "images_total": self.total, "stage_images_total": self.stage_total,
            "images_per_second": round(rate, 1), "eta_seconds": 0 if done else None if eta is None else round(eta),
            "done": done, "updated": now(),
        })
        return True
