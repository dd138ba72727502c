"""Render the job request of a stage: component name, its arguments and the workload config.

The config dictionaries are the contract with the workload entry points in
`noisy_student_workloads` (train, label, balance); the component names and
arguments are those of `noisy_student_workloads.components`.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from noisy_student_workloads.config import CORRUPTION_IMAGES, CORRUPTIONS

from ..api import PlacementFields, RunSpec
from .keys import stage_keys
from .layout import BALANCE, EXPORT, LABEL, PREPARE, STUDENT, TEACHER, RunLayout, Stage, job_name, stage_root


@dataclass(frozen=True)
class JobRequest:
    """Everything a job backend needs to submit one stage attempt."""

    name: str
    stage: Stage
    attempt: int
    component: str
    args: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    key: str = ""
    #: Where the stage writes its outputs (`<root>/stages/<kind>/<key>`).
    prefix: str = ""
    #: Placement, labels and annotations of the stage's jobs and pods (not part of its key).
    placement: PlacementFields = field(default_factory=PlacementFields)


def render_train_config(
    spec: RunSpec, layout: RunLayout, generation: int, teacher_parameters: int | None
) -> dict[str, Any]:
    urls = layout.data_urls(spec)
    student = generation > 0
    noise = spec.noise_for(generation)
    pseudo = None
    teacher = None
    if student:
        pseudo = {
            "manifest": layout.stage_uri(Stage(generation, BALANCE), "manifest.json"),
            "unlabeled": urls["unlabeled"],
            "type": spec.pseudo_labels.type,
            "temperature": spec.pseudo_labels.temperature,
            "ratio": spec.training.unlabeled_ratio,
        }
        teacher = {"model": spec.model_for(generation - 1), "parameters": teacher_parameters}
    rand_augment = noise.rand_augment if noise else None
    return {
        "role": STUDENT if student else TEACHER,
        "model": spec.model_for(generation),
        "model_args": spec.model_spec_for(generation).model_args,
        "num_classes": spec.data.num_classes,
        "image_size": spec.data.image_size,
        "labeled": urls["labeled"],
        "validation": urls["validation"],
        "test": urls.get("test"),
        "pseudo": pseudo,
        "noise": {
            "rand_augment": (
                {"ops": rand_augment.ops, "magnitude": rand_augment.magnitude,
                 "magnitude_max": rand_augment.magnitude_max, "fill": rand_augment.fill}
                if rand_augment else None
            ),
            "dropout": noise.dropout if noise else 0.0,
            "stochastic_depth": noise.stochastic_depth if noise else 0.0,
        },
        "epochs": spec.epochs_for(generation),
        "batch_size": spec.training.batch_size,
        "lr": spec.training.learning_rate,
        "weight_decay": spec.training.weight_decay,
        "optimizer": spec.training.optimizer,
        "warmup_epochs": spec.training.warmup_epochs,
        "label_smoothing": spec.training.label_smoothing,
        "ema_decay": spec.training.ema_decay,
        # A teacher has no pseudo-labeled loss: it keeps the default, so the field never reruns a teacher
        # (and the keys of teachers trained before stay).
        "unlabeled_loss_weight": spec.training.unlabeled_loss_weight if student else "ratio",
        "seed": spec.training.seed + generation,
        "teacher": teacher,
        "allow_smaller_student": spec.training.allow_smaller_student,
        "workers": spec.resources.workers,
        # only when set: the keys of runs that never asked for it stay as they were
        **({"compile": True} if spec.training.compile else {}),
        **({"hflip": True} if spec.training.horizontal_flip else {}),
        **({"init": layout.checkpoint_uri(generation - 1)} if student and spec.students[generation - 1].init == "teacher"
           else {}),
        # The robustness check's inputs are part of what the stage computes (its metrics): rendered, so that
        # they enter its key.
        "corruption_images": CORRUPTION_IMAGES,
        "corruptions": {name: list(levels) for name, levels in CORRUPTIONS.items()},
        "output": layout.stage_uri(Stage(generation, STUDENT if student else TEACHER)) + "/",
    }


def render_label_config(spec: RunSpec, layout: RunLayout, generation: int) -> dict[str, Any]:
    return {
        "checkpoint": layout.checkpoint_uri(generation - 1),
        "unlabeled": layout.data_urls(spec)["unlabeled"],
        "batch_size": max(256, spec.training.batch_size),
        "topk": 5,
        "output": layout.stage_uri(Stage(generation, LABEL)) + "/",
    }


def render_balance_config(spec: RunSpec, layout: RunLayout, generation: int) -> dict[str, Any]:
    pseudo = spec.pseudo_labels
    return {
        "labels": layout.stage_uri(Stage(generation, LABEL)) + "/",
        "num_classes": spec.data.num_classes,
        "confidence_threshold": pseudo.confidence_threshold,
        "images_per_class": pseudo.images_per_class,
        "balance": pseudo.balance,
        "seed": spec.training.seed + generation,
        "output": layout.stage_uri(Stage(generation, BALANCE)) + "/",
    }


def render_export_config(spec: RunSpec, layout: RunLayout) -> dict[str, Any]:
    """The export stage: every generation's training output, in order, and what the report shows."""
    urls = layout.data_urls(spec)
    students = range(1, len(spec.students) + 1)
    return {
        "generations": [layout.stage_uri(Stage(0, TEACHER)) + "/"]
        + [layout.stage_uri(Stage(g, STUDENT)) + "/" for g in students],
        "labels": [layout.stage_uri(Stage(g, LABEL)) + "/" for g in students],
        "balances": [layout.stage_uri(Stage(g, BALANCE)) + "/" for g in students],
        "stop_when_gain_below": spec.stop_when_gain_below,
        "validation": urls["validation"],
        "unlabeled": urls["unlabeled"],
        "num_classes": spec.data.num_classes,
        "recipe": spec.model_dump(
            mode="json", by_alias=True, include={"noise", "pseudo_labels", "training", "teacher", "students"}
        ),
        "output": layout.stage_uri(Stage(len(spec.students), EXPORT)) + "/",
        # The report also goes next to the run's own files (not part of the key: runs share the stage).
        "run_prefix": layout.prefix + "/",
    }


def _replica_args(spec: RunSpec, kind: str) -> dict[str, Any]:
    resources = spec.resources.for_stage(kind)
    args = {"image": spec.resources.image, "cpu": resources.cpu, "memMB": resources.memory_mi_b}
    if kind in (TEACHER, STUDENT, LABEL):
        args["gpu"] = resources.gpu
    if kind in (TEACHER, STUDENT):
        nodes = resources.nodes
        args["nnodes"] = str(nodes.min) if nodes.min == nodes.max else f"{nodes.min}:{nodes.max}"
        args["nproc_per_node"] = resources.procs_per_node
    return args


#: Layouts computed lately (a pass over a run computes its keys: half of a timer pass's CPU).
_LAYOUTS: OrderedDict[tuple[str, str, str, str], RunLayout] = OrderedDict()
#: Runs whose layouts are kept: a timer interval's worth of passes at a thousand runs, and more.
LAYOUT_CACHE = 4096
_layouts_lock = threading.Lock()


def run_layout(spec: RunSpec, namespace: str, name: str, workload: str) -> RunLayout:
    """The run's layout with the key of every stage of its spec (see `keys`).

    A pure function of its arguments, kept for the last `LAYOUT_CACHE` of them (the spec by its
    JSON); the layout returned is shared, its keys read-only. The workload defaults that keys
    cover (`noisy_student_workloads.config`) are constants of a process."""
    cache_key = (spec.model_dump_json(), namespace, name, workload)
    with _layouts_lock:
        layout = _LAYOUTS.get(cache_key)
        if layout is not None:
            _LAYOUTS.move_to_end(cache_key)
            return layout
    layout = _run_layout(spec, namespace, name, workload)
    with _layouts_lock:
        _LAYOUTS[cache_key] = layout
        while len(_LAYOUTS) > LAYOUT_CACHE:
            _LAYOUTS.popitem(last=False)
    return layout


def forget_layouts() -> None:
    """Drop the kept layouts (after a change to the workload defaults that keys cover: in tests)."""
    with _layouts_lock:
        _LAYOUTS.clear()


def _run_layout(spec: RunSpec, namespace: str, name: str, workload: str) -> RunLayout:
    root = stage_root(spec.artifacts.uri, namespace)

    def render(stage: Stage, keys: Mapping[Stage, str]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        request = render_job(spec, RunLayout(root, name, keys), stage, 0, None)
        return request.args, request.config

    return RunLayout(root, name, MappingProxyType(stage_keys(spec, root, workload, render)))


def render_job(
    spec: RunSpec,
    layout: RunLayout,
    stage: Stage,
    attempt: int,
    teacher_parameters: int | None,
) -> JobRequest:
    """The job request of one attempt of `stage`."""
    key = layout.key(stage)
    request = _render_job(spec, layout, job_name(stage, key, attempt), stage, attempt, teacher_parameters)
    return dataclasses.replace(
        request, key=key, prefix=layout.stage_prefix(stage), placement=spec.placement_for(stage.kind)
    )


def _render_job(
    spec: RunSpec,
    layout: RunLayout,
    name: str,
    stage: Stage,
    attempt: int,
    teacher_parameters: int | None,
) -> JobRequest:
    args = _replica_args(spec, stage.kind)
    if stage.kind == PREPARE:
        prepare = spec.data.prepare
        assert prepare is not None  # plan_stages adds the stage only with prepare
        args.update(
            source=prepare.source,
            output=layout.stage_prefix(stage) + "/",
            labels_per_class=prepare.labels_per_class,
            seed=prepare.seed,
            shard_size=prepare.shard_size,
            path=prepare.path,
            validation_size=prepare.validation_size,
            test_split=prepare.test_split,
        )
        return JobRequest(name, stage, attempt, "prepare", args, None)
    if stage.kind in (TEACHER, STUDENT):
        config = render_train_config(spec, layout, stage.generation, teacher_parameters)
        return JobRequest(name, stage, attempt, "train", args, config)
    if stage.kind == LABEL:
        args["replicas"] = spec.resources.label_shards
        return JobRequest(name, stage, attempt, "label", args, render_label_config(spec, layout, stage.generation))
    if stage.kind == BALANCE:
        return JobRequest(name, stage, attempt, "balance", args, render_balance_config(spec, layout, stage.generation))
    if stage.kind == EXPORT:
        return JobRequest(name, stage, attempt, "export", args, render_export_config(spec, layout))
    raise ValueError(f"unknown stage kind {stage.kind!r}")
