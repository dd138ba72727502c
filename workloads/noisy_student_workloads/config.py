"""Stage configurations: the contract between the core planner and the workloads.

The planner renders one JSON object per stage; each entry point reads it with
:func:`load_config` (``--config`` is a JSON string or the URI of a JSON file)
and validates it with the model below. Keys are snake_case, unknown keys are
rejected, and every error names the offending field. This module imports no
torch, so the operator can import it to render configs.

Example::

    python -c "from noisy_student_workloads.config import BalanceConfig; \
print(BalanceConfig(labels='file:///tmp/l/', num_classes=10, output='file:///tmp/b/'))"
"""

from __future__ import annotations

import json
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .store import open_store


class ConfigError(ValueError):
    """A stage config is malformed; the message names the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RandAugmentConfig(_Strict):
    """timm RandAugment: ``ops`` operations per image at magnitude ``magnitude`` (10 = timm's full strength).

    Each image's magnitude is drawn around ``magnitude`` (std 0.5) and clipped to
    ``[0, magnitude_max]``; ``fill`` colours the borders rotations, shears and
    translations leave: the data's mean pixel, or black, grey (128, the official
    code's) or white.
    """

    ops: int = Field(2, ge=1, le=10)
    magnitude: float = Field(9, ge=0, le=30)
    magnitude_max: int = Field(30, ge=1, le=30)
    fill: Literal["mean", "black", "grey", "white"] = "mean"

    @model_validator(mode="after")
    def _check_range(self) -> RandAugmentConfig:
        if self.magnitude > self.magnitude_max:
            raise ValueError(f"magnitude: {self.magnitude:g} is above magnitude_max ({self.magnitude_max:g}); "
                             "it would be clipped")
        return self


class NoiseConfig(_Strict):
    """Student noise: input noise (RandAugment) and model noise (dropout, stochastic depth)."""

    rand_augment: RandAugmentConfig | None = None
    dropout: float = Field(0.0, ge=0, lt=1)
    stochastic_depth: float = Field(0.0, ge=0, lt=1)


class PseudoConfig(_Strict):
    """Pseudo-labeled data for a student: the balance manifest and the unlabeled shards."""

    manifest: str = Field(min_length=1)
    unlabeled: str = Field(min_length=1)
    type: Literal["soft", "hard"] = "soft"
    temperature: float = Field(1.0, gt=0)
    ratio: int = Field(3, ge=1)


#: timm.create_model arguments the workload sets itself, and from what.
RESERVED_MODEL_ARGS = {
    "model_name": "model", "pretrained": "no weights can be downloaded", "pretrained_cfg": "no weights",
    "pretrained_cfg_overlay": "no weights", "checkpoint_path": "no weights", "num_classes": "num_classes",
    "in_chans": "RGB input", "drop_rate": "noise.dropout", "drop_path_rate": "noise.stochastic_depth",
}
ModelArg = bool | int | float | str | list[bool | int | float | str] | None


class TeacherRef(_Strict):
    """The teacher a student learns from (used to refuse a smaller student)."""

    model: str = Field(min_length=1)
    parameters: int = Field(ge=1)


#: The robustness check's corruptions (:mod:`.corruptions`): name → its parameter at severities 1, 2, 3. The
#: operator renders this table and :data:`CORRUPTION_IMAGES` into every training config, so that a change of
#: either changes the keys of the stages that score them.
CORRUPTIONS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.08, 0.18, 0.38),  # ImageNet-C's sigma at levels 1, 3, 5
    "gaussian_blur": (0.5, 1.0, 1.5),  # pixels at 28 px (ImageNet-C: 1, 3, 6 at 224 px)
    "contrast": (0.4, 0.2, 0.05),  # ImageNet-C's factor at levels 1, 3, 5
    "brightness": (1.5, 2.0, 3.0),  # multiplies every pixel (saturates bright ones)
    "pixelate": (0.6, 0.4, 0.25),  # ImageNet-C's resize factor at levels 1, 3, 5
}
#: Images whose corrupted copies the final model is scored on.
CORRUPTION_IMAGES = 2000


class TrainConfig(_Strict):
    """Config of ``noisy_student_workloads.train`` (teacher or student)."""

    role: Literal["teacher", "student"]
    model: str = Field(min_length=1)
    model_args: dict[str, ModelArg] = Field(default_factory=dict, description="keyword arguments of timm.create_model")
    num_classes: int = Field(ge=2)
    image_size: int = Field(32, ge=8, le=1024)
    labeled: str = Field(min_length=1)
    validation: str = Field(min_length=1)
    test: str | None = Field(None, min_length=1, description="test shards, scored once by the final model")
    pseudo: PseudoConfig | None = None
    noise: NoiseConfig = NoiseConfig()
    epochs: int = Field(ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(0.1, gt=0)
    weight_decay: float = Field(5e-5, ge=0)
    optimizer: str = Field("sgd", min_length=1)
    warmup_epochs: int = Field(0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="smoothing of labeled and hard pseudo-label targets")
    ema_decay: float = Field(0.9999, ge=0, lt=1, description="weight EMA decay (0: none); evaluated, labels")
    unlabeled_loss_weight: Literal["ratio", "equal"] = Field(
        "ratio", description="ratio: (labeled·B + pseudo·rB)/B, the official weighting; equal: the two means added")
    hflip: bool = Field(False, description="mirror half the training images left-right (the official code's base "
                        "augmentation; not for digits or letters)")
    seed: int = 0
    init: str | None = Field(None, min_length=1, description="URI of a final checkpoint (its average when it has one) "
                             "the model starts from instead of random weights (the official code's "
                             "--init_model_path); same model and model_args")
    teacher: TeacherRef | None = None
    allow_smaller_student: bool = False
    workers: int = Field(2, ge=0, description="most data-loader worker processes (fewer when cores are short)")
    eval_images: int = Field(500, ge=1, description="validation images scored after each epoch but the last")
    corruption_images: int = Field(CORRUPTION_IMAGES, ge=0, description="test (else validation) images whose "
                                   "corrupted copies the final model is scored on (0: none)")
    corruptions: dict[str, list[float]] = Field(
        default_factory=lambda: {k: list(v) for k, v in CORRUPTIONS.items()},
        description="the robustness check's corruptions: name → its parameter at each severity")
    keep_checkpoints: int = Field(2, ge=1, description="epoch checkpoints kept (the latest ones)")
    shuffle_buffer: int = Field(1000, ge=1, description="samples in the training shuffle buffer")
    compile: bool = Field(False, description="torch.compile the model (pays on a GPU for long runs)")
    output: str = Field(min_length=1)

    @model_validator(mode="after")
    def _check_role(self) -> TrainConfig:
        if self.role == "student" and self.pseudo is None:
            raise ValueError("pseudo: a student needs pseudo-labeled data (role is 'student')")
        if self.role == "teacher" and self.pseudo is not None:
            raise ValueError("pseudo: a teacher trains on labeled data only; set pseudo to null")
        for name in self.model_args:
            if not name.isidentifier():
                raise ValueError(f"model_args: {name!r} is not a keyword argument name")
            if name in RESERVED_MODEL_ARGS:
                raise ValueError(f"model_args: {name!r} is set by the workload ({RESERVED_MODEL_ARGS[name]})")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs > 0:
            raise ValueError(f"warmup_epochs: {self.warmup_epochs} must be less than epochs ({self.epochs})")
        for name, levels in self.corruptions.items():
            if name not in CORRUPTIONS:
                raise ValueError(f"corruptions: {name!r} is not one of {sorted(CORRUPTIONS)}")
            if not levels:
                raise ValueError(f"corruptions: {name!r} has no severity")
        return self


class LabelConfig(_Strict):
    """Config of ``noisy_student_workloads.label`` (one replica of N)."""

    checkpoint: str = Field(min_length=1)
    unlabeled: str = Field(min_length=1)
    batch_size: int = Field(256, ge=1)
    topk: int = Field(5, ge=1)
    output: str = Field(min_length=1)


class ExportConfig(_Strict):
    """Config of ``noisy_student_workloads.export``: every generation's training output, in order."""

    generations: list[str] = Field(min_length=1, description="teacher, then each student: stage output prefixes")
    labels: list[str] = Field(default_factory=list, description="label stage prefixes of generations 1..N")
    balances: list[str] = Field(default_factory=list, description="balance stage prefixes of generations 1..N")
    stop_when_gain_below: float | None = Field(None, ge=0, le=1)
    validation: str = Field(min_length=1)
    unlabeled: str = Field(min_length=1)
    num_classes: int = Field(ge=2)
    recipe: dict[str, Any] = Field(default_factory=dict, description="the spec's training recipe, for the card")
    run_prefix: str | None = Field(None, description="the run's own prefix: a copy of report.html goes there")
    output: str = Field(min_length=1)


class BalanceConfig(_Strict):
    """Config of ``noisy_student_workloads.balance``."""

    labels: str = Field(min_length=1)
    num_classes: int = Field(ge=2)
    confidence_threshold: float = 0.3
    images_per_class: Literal["auto"] | int = "auto"
    balance: bool = True
    seed: int = 0
    output: str = Field(min_length=1)

    @model_validator(mode="after")
    def _check_ranges(self) -> BalanceConfig:
        if not 0.0 <= self.confidence_threshold <= 1.0:
            raise ValueError(f"confidence_threshold: {self.confidence_threshold} is outside [0, 1]")
        if isinstance(self.images_per_class, int) and self.images_per_class < 1:
            raise ValueError(f"images_per_class: {self.images_per_class} must be 'auto' or a positive integer")
        return self


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def _describe(exc: ValidationError, kind: str) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{field}: {msg}" if field and not msg.startswith(f"{field}:") else msg)
    return f"invalid {kind} config: " + "; ".join(lines)


def parse_config(raw: dict[str, Any] | str, model: type[ConfigT]) -> ConfigT:
    """Validate a config mapping (or ``--config`` argument) against ``model``.

    Raises :class:`ConfigError` whose message names each offending field.
    """
    data = load_config(raw) if isinstance(raw, str) else raw
    if not isinstance(data, dict):
        raise ConfigError(f"invalid {model.__name__} config: expected a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, model.__name__)) from None


def load_config(arg: str) -> Any:
    """Parse ``--config``: inline JSON (starts with ``{``) or the URI of a JSON file."""
    text = arg.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--config: not valid JSON: {exc}") from None
    try:
        return open_store(text).get_json(text)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"--config: {exc}") from None
