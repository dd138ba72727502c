"""Checks the local runner makes before it launches anything.

The API schema cannot know timm's model registry, parameter counts or which
shards exist; the local runner has the workloads installed, so it checks them
up front and names the field, instead of failing minutes later inside a job.
(The operator has no torch; there the workloads report the same errors.)
"""

from __future__ import annotations

from noisy_student_workloads.store import expand_shards

from .api import NoisyStudentRun
from .core.layout import RunLayout


class PreflightError(ValueError):
    """One or more problems, each naming the field."""


def _parameters(model: str, num_classes: int, model_args: dict) -> int:
    import timm
    import torch

    with torch.device("meta"):
        net = timm.create_model(model, pretrained=False, num_classes=num_classes, **model_args)
    return sum(p.numel() for p in net.parameters())


def check_models(run: NoisyStudentRun) -> list[str]:
    import difflib

    import timm

    spec = run.spec
    problems = []
    fields = [("spec.teacher.model", spec.teacher.model)] + [
        (f"spec.students[{i}].model", s.model) for i, s in enumerate(spec.students)
    ]
    entries = [spec.teacher, *spec.students]
    for field, name in fields:
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
            hint = f" (close matches: {', '.join(close)})" if close else ""
            problems.append(f"{field}: unknown timm model {name!r}{hint}")
    if problems or spec.training.allow_smaller_student:
        return problems
    counts = []
    for (field, name), entry in zip(fields, entries):
        try:
            counts.append(_parameters(name, spec.data.num_classes, entry.model_args))
        except (TypeError, ValueError, AssertionError) as error:  # the constructor names the argument
            if not entry.model_args:
                raise
            problems.append(f"{field.removesuffix('.model')}.modelArgs: {name!r} does not take "
                            f"{entry.model_args}: {error}")
    if problems:
        return problems
    for i in range(1, len(fields)):
        if counts[i] < counts[i - 1]:
            problems.append(
                f"{fields[i][0]}: {fields[i][1]} has {counts[i]:,} parameters, fewer than its teacher "
                f"{fields[i - 1][1]} ({counts[i - 1]:,}); students must be equal or larger "
                "(set spec.training.allowSmallerStudent to allow it)"
            )
    return problems


def check_shards(run: NoisyStudentRun) -> list[str]:
    """Given shard URLs must exist (prepared data is checked by its own stage)."""
    spec = run.spec
    if spec.data.prepare is not None:
        return []
    urls = RunLayout.for_run(spec, run.metadata.namespace, run.metadata.name).data_urls(spec)
    problems = []
    for split, pattern in urls.items():
        try:
            if not expand_shards(pattern):
                problems.append(f"spec.data.{split}: no shards match {pattern}")
        except (FileNotFoundError, ValueError) as error:
            problems.append(f"spec.data.{split}: {error}")
    return problems


def preflight(run: NoisyStudentRun) -> None:
    """Raise `PreflightError` listing every problem found."""
    problems = check_models(run) + check_shards(run)
    if problems:
        raise PreflightError("invalid run:\n  " + "\n  ".join(problems))
