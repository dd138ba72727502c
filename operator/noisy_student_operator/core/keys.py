"""Stage keys: a digest of everything that determines a stage's outputs.

A stage's key hashes the stage's rendered job — its workload config and the
component arguments that change results — without its own output location,
so each input appears as the location of the stage that produced it, and that
location contains the producer's key. A key therefore covers its whole
upstream chain. The artifact root (`<artifacts.uri>/<namespace>`) and the
workload version (the image on a cluster, the package version locally) enter
every key; scheduling, retries, `suspend`, resources that cannot change a
result (CPU, memory), guards that only refuse a job (`allowSmallerStudent`;
the export's report shows it) and the run's name do not. See
`docs/stage-keys.md`.

    python -c "from noisy_student_operator.core.keys import stage_keys; help(stage_keys)"
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

from ..api import RunSpec
from .layout import PENDING_KEY, Stage, plan_stages

#: Hex digits of a key (64 bits: collisions are out of reach for any artifact store).
KEY_LENGTH = 16
#: Component arguments that place or size a job without changing what it computes.
_PLACEMENT_ARGS = ("image", "cpu", "memMB", "gpu", "output")
#: Config keys that say where outputs go, not what they are (the export's copy of the report for its run).
_PLACEMENT_CONFIG = ("output", "run_prefix")
#: Config keys that only let a job run or refuse it, never change what it computes: held at their default in the
#: key, so that allowing what a check refused keeps every stage done, and the keys of stages stored before stay.
_GUARD_CONFIG = {"allow_smaller_student": False}
#: Bump when the meaning of key material changes, so that no old output is taken for a new one.
KEY_SCHEMA = 1


def package_version() -> str:
    try:
        return metadata.version("noisy-student-operator")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def workload_identity(spec: RunSpec, scheduler: str) -> str:
    """What runs the stages: the image on a cluster, this package's version on `local_cwd`."""
    if scheduler == "kubernetes":
        return f"image:{spec.resources.image}"
    return f"noisy-student-operator=={package_version()}"


def key_material(request_args: Mapping[str, Any], config: Mapping[str, Any] | None, spec: RunSpec) -> dict[str, Any]:
    """The parts of a rendered job that determine its outputs."""
    args = {k: v for k, v in request_args.items() if k not in _PLACEMENT_ARGS}
    cfg = None
    if config is not None:
        cfg = {k: _GUARD_CONFIG.get(k, v) for k, v in config.items() if k not in _PLACEMENT_CONFIG}
        if isinstance(cfg.get("teacher"), dict):
            # The teacher's parameter count is a function of the teacher's key, read after it ran.
            cfg["teacher"] = {k: v for k, v in cfg["teacher"].items() if k != "parameters"}
    # The stage's own GPUs decide its numerics; balancing and preparation have none and keep the
    # run's, so that keys of runs without per-stage resources stay what they were.
    gpu = request_args.get("gpu", spec.resources.gpu)
    return {"args": args, "config": cfg, "accelerator": "cuda" if gpu else "cpu"}


def stage_keys(
    spec: RunSpec,
    root: str,
    workload: str,
    render: Callable[[Stage, Mapping[Stage, str]], tuple[Mapping[str, Any], Mapping[str, Any] | None]],
) -> dict[Stage, str]:
    """The key of every stage of `spec`, in plan order.

    `render(stage, keys)` returns the stage's component arguments and config
    rendered with the keys of the stages before it (its own output location
    holds a placeholder and is left out).
    """
    keys: dict[Stage, str] = {}
    for stage in plan_stages(spec):
        args, config = render(stage, keys)
        material = {
            "schema": KEY_SCHEMA,
            "kind": stage.kind,
            "root": root,
            "workload": workload,
            **key_material(args, config, spec),
        }
        text = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
        if PENDING_KEY in text:
            raise AssertionError(f"the key material of {stage.describe()} refers to its own output")
        keys[stage] = hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]
    return keys
