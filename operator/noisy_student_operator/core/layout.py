"""Stages of a run, their deterministic job names and their artifact URIs.

The artifact layout is a contract between the core, the workloads and users::

    <artifacts.uri>/<namespace>/<run>/
      data/                 (only with spec.data.prepare)
      gen-0/teacher/{checkpoint.pt, metrics.json, config.json, _DONE.json}
      gen-1/labels/{part-00000.npz, stats-00000.json, ..., _DONE.json}
      gen-1/balance/{manifest.npz, thresholds.json, _DONE.json}
      gen-1/student/{checkpoint.pt, checkpoints/epoch-*.pt, metrics.json, _DONE.json}
"""

from __future__ import annotations

from dataclasses import dataclass

from noisy_student_workloads.store import join_uri

from ..api import RunSpec

MARKER = "_DONE.json"
STATUS_FILE = "status.json"

PREPARE = "prepare"
TEACHER = "teacher"
LABEL = "label"
BALANCE = "balance"
STUDENT = "student"

#: The `status.stage` summary shown while a stage of each kind runs.
STAGE_SUMMARY = {
    PREPARE: "Preparing",
    TEACHER: "Training",
    LABEL: "Labeling",
    BALANCE: "Balancing",
    STUDENT: "Training",
}

_DIRECTORY = {TEACHER: "teacher", LABEL: "labels", BALANCE: "balance", STUDENT: "student"}


@dataclass(frozen=True, order=True)
class Stage:
    """One step of the run: a stage kind within a generation."""

    generation: int
    kind: str

    @property
    def directory(self) -> str:
        """Path of the stage's outputs below the run prefix."""
        if self.kind == PREPARE:
            return "data"
        return f"gen-{self.generation}/{_DIRECTORY[self.kind]}"

    @property
    def is_training(self) -> bool:
        return self.kind in (TEACHER, STUDENT)

    def describe(self) -> str:
        if self.kind == PREPARE:
            return "data preparation"
        if self.kind == TEACHER:
            return "teacher training"
        return f"{self.kind} of generation {self.generation}"


def plan_stages(spec: RunSpec) -> list[Stage]:
    """All stages of a run in order."""
    stages = [Stage(0, PREPARE)] if spec.data.prepare else []
    stages.append(Stage(0, TEACHER))
    for generation in range(1, len(spec.students) + 1):
        stages += [Stage(generation, LABEL), Stage(generation, BALANCE), Stage(generation, STUDENT)]
    return stages


def job_name(run: str, stage: Stage, attempt: int) -> str:
    """Deterministic child job name: `<run>-g<generation>-<stage>[-<attempt>]`."""
    name = f"{run}-g{stage.generation}-{stage.kind}"
    return f"{name}-{attempt}" if attempt else name


@dataclass(frozen=True)
class RunLayout:
    """Where one run's artifacts live."""

    prefix: str

    @classmethod
    def for_run(cls, spec: RunSpec, namespace: str, name: str) -> RunLayout:
        return cls(join_uri(spec.artifacts.uri, namespace, name))

    def stage_uri(self, stage: Stage, *parts: str) -> str:
        return join_uri(self.prefix, stage.directory, *parts)

    def marker_uri(self, stage: Stage) -> str:
        return self.stage_uri(stage, MARKER)

    def checkpoint_uri(self, generation: int) -> str:
        kind = TEACHER if generation == 0 else STUDENT
        return self.stage_uri(Stage(generation, kind), "checkpoint.pt")

    @property
    def status_uri(self) -> str:
        return join_uri(self.prefix, STATUS_FILE)

    def data_urls(self, spec: RunSpec) -> dict[str, str]:
        """Shard URLs of the three splits; prepared data lives under `data/`."""
        data = spec.data
        prepared = join_uri(self.prefix, "data")
        return {
            split: getattr(data, split) or join_uri(prepared, f"{split}-*.tar")
            for split in ("labeled", "unlabeled", "validation")
        }
