"""Stages of a run, their deterministic job names and their artifact URIs.

The artifact layout is a contract between the core, the workloads and users.
Stage outputs live under the stage's key (see `keys`), shared by every run of
the namespace that needs the same stage; the run's own prefix holds what
belongs to the run::

    <artifacts.uri>/<namespace>/
      stages/prepare/<key>/{labeled-*.tar, unlabeled-*.tar, validation-*.tar, _DONE.json}
      stages/teacher/<key>/{checkpoint.pt, checkpoints/epoch-*.pt, metrics.json, config.json, _DONE.json}
      stages/label/<key>/{part-00000-00000.npz, ..., stats-00000.json, part-00000.done.json, ..., _DONE.json}
      stages/balance/<key>/{manifest.json, manifest/*.npz, thresholds.json, _DONE.json}
      stages/student/<key>/{checkpoint.pt, checkpoints/epoch-*.pt, metrics.json, _DONE.json}
      stages/export/<key>/{model/{config.json, model.safetensors, README.md}, report.html, _DONE.json}
      <run>/{stages.json, status.json, spec.json, top1.png}   (local runner), report.html (export stage)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from noisy_student_workloads.store import join_uri

from ..api import SOURCES_WITH_TEST, RunSpec

MARKER = "_DONE.json"
LEASE = "_LEASE.json"
STATUS_FILE = "status.json"
MANIFEST_FILE = "stages.json"
#: A running training stage's progress (see `noisy_student_workloads.stage.ProgressFile`).
PROGRESS_FILE = "progress.json"

STAGES_DIR = "stages"
#: Stands for a stage's own key while the key is being computed (see `keys`).
PENDING_KEY = "<self>"

PREPARE = "prepare"
TEACHER = "teacher"
LABEL = "label"
BALANCE = "balance"
STUDENT = "student"
EXPORT = "export"

#: The `status.stage` summary shown while a stage of each kind runs.
STAGE_SUMMARY = {
    PREPARE: "Preparing",
    TEACHER: "Training",
    LABEL: "Labeling",
    BALANCE: "Balancing",
    STUDENT: "Training",
    EXPORT: "Exporting",
}

@dataclass(frozen=True, order=True)
class Stage:
    """One step of the run: a stage kind within a generation."""

    generation: int
    kind: str

    @property
    def is_training(self) -> bool:
        return self.kind in (TEACHER, STUDENT)

    def describe(self) -> str:
        if self.kind == PREPARE:
            return "data preparation"
        if self.kind == TEACHER:
            return "teacher training"
        if self.kind == EXPORT:
            return "export of the best model"
        return f"{self.kind} of generation {self.generation}"


def label_progress_file(replica: int) -> str:
    """A running label replica's progress, `progress-RRRRR.json` (`noisy_student_workloads.predictions.
    progress_name`, written by `noisy_student_workloads.stage.ImageProgress`)."""
    return f"progress-{replica:05d}.json"


def plan_stages(spec: RunSpec) -> list[Stage]:
    """All stages of a run in order."""
    stages = [Stage(0, PREPARE)] if spec.data.prepare else []
    stages.append(Stage(0, TEACHER))
    for generation in range(1, len(spec.students) + 1):
        stages += [Stage(generation, LABEL), Stage(generation, BALANCE), Stage(generation, STUDENT)]
    # Last: the best generation in timm's folder layout, with the run's report.
    stages.append(Stage(len(spec.students), EXPORT))
    return stages


def job_name(stage: Stage, key: str, attempt: int) -> str:
    """Deterministic child job name: `<stage>-<key>[-<attempt>]`.

    Named after the key, not the run: two runs that need the same stage ask
    for the same job, and the scheduler's create-if-absent starts it once. The
    name is a DNS-1035 label of at most 32 characters, so that every name
    Volcano derives from it (pods, Service, host names) fits its limits.
    """
    name = f"{stage.kind}-{key}"
    return f"{name}-{attempt}" if attempt else name


@dataclass(frozen=True)
class RunLayout:
    """Where one run's artifacts and its stages' outputs live."""

    root: str  # <artifacts.uri>/<namespace>
    name: str
    keys: Mapping[Stage, str] = field(default_factory=dict)

    @classmethod
    def for_run(cls, spec: RunSpec, namespace: str, name: str, workload: str | None = None) -> RunLayout:
        """The layout of a run with its stage keys; `workload` defaults from `spec.scheduler.name`."""
        from .keys import workload_identity
        from .render import run_layout

        return run_layout(spec, namespace, name, workload or workload_identity(spec, spec.scheduler.name))

    @property
    def prefix(self) -> str:
        """The run's own prefix (status, manifest, plots)."""
        return join_uri(self.root, self.name)

    def key(self, stage: Stage) -> str:
        return self.keys.get(stage, PENDING_KEY)

    def stage_prefix(self, stage: Stage) -> str:
        return join_uri(self.root, STAGES_DIR, stage.kind, self.key(stage))

    def stage_uri(self, stage: Stage, *parts: str) -> str:
        return join_uri(self.stage_prefix(stage), *parts)

    def marker_uri(self, stage: Stage) -> str:
        return self.stage_uri(stage, MARKER)

    def model_uri(self, spec: RunSpec) -> str:
        """The exported model folder (timm layout) of the export stage."""
        return self.stage_uri(Stage(len(spec.students), EXPORT), "model") + "/"

    def checkpoint_uri(self, generation: int) -> str:
        kind = TEACHER if generation == 0 else STUDENT
        return self.stage_uri(Stage(generation, kind), "checkpoint.pt")

    @property
    def status_uri(self) -> str:
        return join_uri(self.prefix, STATUS_FILE)

    @property
    def manifest_uri(self) -> str:
        return join_uri(self.prefix, MANIFEST_FILE)

    def data_urls(self, spec: RunSpec) -> dict[str, str]:
        """Shard URLs of the splits (``test`` when there is one); prepared data lives under the prepare stage."""
        data = spec.data
        prepared = self.stage_prefix(Stage(0, PREPARE))
        urls = {
            split: getattr(data, split) or join_uri(prepared, f"{split}-*.tar")
            for split in ("labeled", "unlabeled", "validation")
        }
        if data.test:
            urls["test"] = data.test
        elif data.prepare is not None and data.prepare.test_split and data.prepare.source in SOURCES_WITH_TEST:
            urls["test"] = join_uri(prepared, "test-*.tar")
        return urls


def stage_root(artifacts_uri: str, namespace: str) -> str:
    """`<artifacts.uri>/<namespace>`: the prefix that a namespace's stages and runs share."""
    return join_uri(artifacts_uri, namespace)
