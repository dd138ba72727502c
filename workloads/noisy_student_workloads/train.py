"""Train a teacher, or a noisy student on labeled + pseudo-labeled images.

Started by torchrun inside a TorchX job (one process per device); works the
same as a single plain process. Reads one config (see
:class:`noisy_student_workloads.config.TrainConfig`), writes ``config.json``,
``progress.json`` (at most every 5 s: epoch, images/s, ETA, latest top-1;
see :class:`.stage.ProgressFile`), ``checkpoints/epoch-NNN.pt`` every epoch, the final
``checkpoint.pt`` and ``metrics.json``, then ``_DONE.json`` last.

Recipe:

* **Data.** Shards are streamed (:mod:`.pipeline`): nothing is decoded
  ahead of the step that needs it, so memory does not grow with the data
  set. Each epoch shuffles the shard order, each process reads only its
  contiguous share of the (shuffled) positions and shuffles it with a
  buffer of ``shuffle_buffer`` samples; balanced pseudo-labels take as
  many positions as their copy count. The balance manifest is read the
  same way: its index first, then each unlabeled shard's block of entries
  (copies and soft targets) as that shard is read (:mod:`.manifest`).
* **Steps.** Each step draws a labeled batch of ``batch_size`` images and,
  for a student, a pseudo-labeled batch of ``ratio × batch_size`` images.
  An epoch is as many steps as it takes to see the larger of the two sets
  once; the smaller one cycles. ``batch_size`` is global: with W processes
  each takes its 1/W share of the step's batch.
* **Loss.** As the official code (``google-research/noisystudent``
  ``main.py``): cross-entropy on the labeled batch (B images) and soft
  cross-entropy on the pseudo-labeled batch (rB images), combined as
  ``(labeled·B + pseudo·rB) / B`` — the pseudo-labeled term weighs ``r``
  times a labeled one, as many images as it has (``unlabeled_loss_weight:
  equal`` adds the two means instead). Labeled and hard pseudo-labeled
  targets are smoothed (``label_smoothing``, official 0.1); soft targets are
  the teacher's distribution re-tempered as ``p^(1/T)`` normalised (the same
  as ``softmax(logits / T)``), unsmoothed; hard targets are its argmax.
* **Weight EMA.** With ``ema_decay`` > 0 an exponential moving average of
  the weights and BatchNorm statistics follows every update, with the
  official (TensorFlow) warm-up ``decay_n = min(ema_decay, (1 + n) / (10 + n))``
  at update n. The average is what is evaluated, what the final checkpoint
  offers for labeling and export (its ``ema`` entry), and what epoch
  checkpoints resume.
* **Noise.** Input: timm RandAugment when ``noise.rand_augment`` is set, plus
  a small random crop for every training image (and, with ``hflip``, a mirror
  image for half of them). Model: dropout before the
  classifier (``drop_rate``) and stochastic depth (``drop_path_rate``).
* **Schedule.** timm optimizer factory (``sgd`` is SGD with Nesterov
  momentum 0.9) and a per-step cosine schedule with linear warm-up.
* **Metrics.** ``top1``/``top5`` (fractions) of the final model (the EMA
  when kept; ``top1_raw`` is then the raw weights') on the whole validation
  set; earlier epochs in ``history`` are scored on the first
  ``eval_images`` validation images (a fixed budget), for progress only.
* **Test.** With ``test`` shards the final model is scored on them once
  (``test_top1``/``test_top5``); validation is what epochs report and what
  a recipe is tuned on.
* **Robustness.** The final model is also scored on corrupted copies of the
  first ``corruption_images`` test images (validation images without a test
  split; :mod:`.corruptions`: noise, blur, contrast, brightness, pixelation
  at three severities):
  ``corruption_top1`` (their mean) and ``corruption`` (per corruption and
  severity).
* **Failures.** A non-finite loss stops training before the epoch's
  checkpoint is written (no NaN weights are saved or promoted); unusable
  data names its shard and key. Both exit 2 with the message.
* **Restarts.** At start the latest ``checkpoints/epoch-NNN.pt`` is loaded
  (model, optimizer, scheduler, every rank's own RNG state, history) and
  training continues at the next epoch; only the last ``keep_checkpoints``
  epoch checkpoints are kept. Data order depends only on (seed, epoch), so
  a resumed run sees the same batches an uninterrupted one would.
* **Speed.** Threads and data-loader workers from the cores this process
  really has (:mod:`.runtime`), workers persistent across epochs,
  ``channels_last``; on a GPU bf16 autocast, ``cudnn.benchmark``, no host
  sync per step, and ``torch.compile`` when ``compile`` is set.

Command line::

    python -m noisy_student_workloads.train --config '{"role": "teacher", "model": "resnet18",
        "num_classes": 10, "labeled": "file:///tmp/d/labeled-{000000..000000}.tar",
        "validation": "file:///tmp/d/validation-{000000..000000}.tar", "epochs": 3,
        "output": "file:///tmp/run/gen-0/teacher/"}'
"""

from __future__ import annotations

import io
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import images as imgs
from .config import ConfigError, PseudoConfig, TrainConfig
from .corruptions import corrupt
from .manifest import Manifest
from .models import count_parameters, create_model, normalization, save_final, start_from
from .pipeline import (
    Copies, DataError, ImageBatches, ShardCatalog, Stream, TrainBatches, decode, unwrap,
)
from .runtime import CoreShare
from .stage import ProgressFile, event, put, put_json, run_entry_point, sha256, write_done
from .store import expand_shards, join_uri, open_store

EVAL_BATCH = 512
# Images decoded to pick RandAugment's fill colour (the data's mean pixel).
FILL_SAMPLE_IMAGES = 256
_CHECKPOINT = re.compile(r"epoch-(\d+)\.pt$")


class NonFiniteLoss(ConfigError):
    """The training loss became NaN or infinite (exits 2: usually a learning rate too high)."""


# ---------------------------------------------------------------------------
# process group


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world: int
    local_world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the torchrun process group when there is more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest kernels once
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_world, device)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


# ---------------------------------------------------------------------------
# data


def open_set(pattern: str, field: str, cfg: TrainConfig, shuffle: bool, copies: Copies | None = None) -> Stream:
    """A shard set as a :class:`Stream`; errors name ``field``."""
    try:
        uris = expand_shards(pattern)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"{field}: {exc}") from None
    if not uris:
        raise ConfigError(f"{field}: {pattern} names no shards")
    catalog = ShardCatalog.of(uris)
    copies = copies or Copies()
    stream = Stream(uris, copies.sizes(uris, catalog), copies, catalog, shuffle, cfg.shuffle_buffer)
    if stream.total == 0:
        raise ConfigError(f"{field}: no images in {pattern}")
    return stream


def smoothed(one_hot: torch.Tensor | np.ndarray, smoothing: float) -> Any:
    """Label smoothing as TensorFlow's ``softmax_cross_entropy``: ``y·(1 − ε) + ε / K``."""
    return one_hot * (1.0 - smoothing) + smoothing / one_hot.shape[1] if smoothing else one_hot


class LabeledTargets:
    """Smoothed one-hot targets of labeled samples; an unlabeled sample or a class out of range names shard and key."""

    def __init__(self, num_classes: int, field: str, smoothing: float = 0.0) -> None:
        self.num_classes, self.field, self.smoothing = num_classes, field, smoothing

    def labels(self, samples: Sequence[dict[str, Any]]) -> torch.Tensor:
        for s in samples:
            if s["label"] is None:
                raise DataError(f"{self.field}: {s['__url__']}: sample {s['__key__']!r} is unlabeled (no .cls)")
            if s["label"] >= self.num_classes:
                raise DataError(f"num_classes: {self.num_classes} but {self.field} {s['__url__']} sample "
                                f"{s['__key__']!r} has class {s['label']}")
        return torch.tensor([s["label"] for s in samples], dtype=torch.int64)

    def __call__(self, samples: Sequence[dict[str, Any]]) -> torch.Tensor:
        return smoothed(F.one_hot(self.labels(samples), self.num_classes).float(), self.smoothing)


def tempered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Re-temper a distribution: ``p^(1/T)`` normalised, i.e. ``softmax(logits / T)``."""
    p = probs.astype(np.float64)
    if temperature != 1.0:
        p = np.power(np.clip(p, 1e-12, None), 1.0 / temperature)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def manifest_targets(columns: dict[str, np.ndarray], num_classes: int, kind: str, temperature: float,
                     smoothing: float = 0.0) -> np.ndarray:
    """Targets (N×K float) of N manifest entries (their ``classes`` and ``probs`` or ``topk_*`` columns):
    smoothed one-hot for ``hard``, re-tempered for ``soft``."""
    classes = columns["classes"].astype(np.int64)
    if kind == "hard":
        return smoothed(np.eye(num_classes, dtype=np.float32)[classes], smoothing).astype(np.float32)
    if "probs" in columns:
        probs = columns["probs"].astype(np.float32)
    else:  # top-k only (many classes): the rest of the mass is unknown, renormalise over the top k
        probs = np.zeros((len(classes), num_classes), dtype=np.float32)
        np.put_along_axis(probs, columns["topk_indices"].astype(np.int64), columns["topk_values"].astype(np.float32),
                          1)
    return tempered(probs, temperature)


class PseudoTargets:
    """Targets of pseudo-labeled samples, from the manifest entry each carries (``sample["pseudo"]``)."""

    def __init__(self, num_classes: int, kind: str, temperature: float, smoothing: float = 0.0) -> None:
        self.num_classes, self.kind = num_classes, kind
        self.temperature, self.smoothing = temperature, smoothing

    def __call__(self, samples: Sequence[dict[str, Any]]) -> torch.Tensor:
        columns = {k: np.stack([s["pseudo"][k] for s in samples]) for k in samples[0]["pseudo"]}
        return torch.from_numpy(manifest_targets(columns, self.num_classes, self.kind, self.temperature,
                                                 self.smoothing))


def open_manifest(pseudo: PseudoConfig, cfg: TrainConfig) -> Copies:
    """The balance manifest's index, checked against the config and the unlabeled shards (its blocks are read
    as the shards are streamed)."""
    manifest = Manifest.open(pseudo.manifest)
    if manifest.rows == 0:
        raise ConfigError(f"pseudo.manifest: {pseudo.manifest} selects no images")
    if manifest.num_classes != cfg.num_classes:
        raise ConfigError(f"num_classes: {cfg.num_classes} but the pseudo-label manifest has "
                          f"{manifest.num_classes} classes")
    try:
        names = {u.rsplit("/", 1)[-1] for u in expand_shards(pseudo.unlabeled)}
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"pseudo.unlabeled: {exc}") from None
    missing = sorted(set(manifest.shards) - names)
    if missing:
        raise ConfigError(f"pseudo.unlabeled: the manifest's shard {missing[0]!r} is not in {pseudo.unlabeled}")
    return Copies(manifest)


FILLS = {"black": [0, 0, 0], "grey": [128, 128, 128], "white": [255, 255, 255]}


def fill_colour(fill: str, stream: Stream, image_size: int) -> list[int]:
    """RandAugment's fill: a named colour, or (``mean``) the mean pixel of the first labeled images
    (the same in every process)."""
    if fill in FILLS:
        return FILLS[fill]
    images = []
    for s in stream.items(0, min(stream.total, FILL_SAMPLE_IMAGES), None, 0, 0):
        images.append(decode(s, image_size))
    return imgs.mean_pixel(images)


# ---------------------------------------------------------------------------
# model


def build_model(cfg: TrainConfig) -> tuple[torch.nn.Module, int]:
    """The timm model with the config's model noise; refuses a student smaller than its teacher."""
    model = create_model(cfg.model, cfg.num_classes, cfg.noise.dropout, cfg.noise.stochastic_depth, cfg.model_args)
    parameters = count_parameters(model)
    teacher = cfg.teacher
    if teacher is not None and parameters < teacher.parameters and not cfg.allow_smaller_student:
        raise ConfigError(
            f"model: student {cfg.model!r} has {parameters:,} parameters, fewer than its teacher "
            f"{teacher.model!r} ({teacher.parameters:,}); Noisy Student needs an equal or larger student "
            "(set allow_smaller_student to train it anyway)"
        )
    return model, parameters


def check_optimizer(name: str) -> None:
    """Unknown optimizer names fail before any data is read."""
    from timm.optim import list_optimizers

    if name.lower() not in list_optimizers():
        raise ConfigError(f"optimizer: unknown timm optimizer {name!r} (e.g. sgd, momentum, adamw, lamb)")


def weight_ema(model: torch.nn.Module, decay: float) -> Any:
    """timm's ``ModelEmaV3`` (every float entry of the state dict: parameters and BatchNorm statistics)
    with the official warm-up, TensorFlow's ``ExponentialMovingAverage(decay, num_updates)``:
    ``min(decay, (1 + n) / (10 + n))`` at update ``n``."""
    from timm.utils import ModelEmaV3

    class WeightEma(ModelEmaV3):
        def get_decay(self, step: int | None = None) -> float:
            return self.decay if step is None else min(self.decay, (1.0 + step) / (10.0 + step))

    return WeightEma(model, decay=decay)


# ---------------------------------------------------------------------------
# checkpoints


def epoch_checkpoints(output: str) -> list[tuple[int, str]]:
    """``(epoch, uri)`` of every ``checkpoints/epoch-NNN.pt`` under ``output``, oldest first."""
    prefix = join_uri(output, "checkpoints/")
    return sorted((int(m.group(1)), u) for u in open_store(prefix).list(prefix) if (m := _CHECKPOINT.search(u)))


def latest_checkpoint(output: str) -> str | None:
    """URI of the highest ``checkpoints/epoch-NNN.pt`` under ``output``, if any."""
    found = epoch_checkpoints(output)
    return found[-1][1] if found else None


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch, CUDA, numpy, python)."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])


def gather_rng(d: Dist) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (on every rank)."""
    if d.world == 1:
        return [rng_state()]
    states: list[Any] = [None] * d.world
    dist.all_gather_object(states, rng_state())
    return states


def save_checkpoint(uri: str, model: torch.nn.Module, ema: Any, optimizer: Any, scheduler: Any, epoch: int,
                    history: list, rng: list[dict[str, Any]]) -> None:
    state = {
        "model": model.state_dict(),
        "ema": ema.module.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "history": history,
        "rng": rng,  # one entry per rank
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    put(uri, buf.getvalue())


def prune_checkpoints(output: str, keep: int) -> None:
    """Delete all but the last ``keep`` epoch checkpoints."""
    found = epoch_checkpoints(output)
    for _, uri in found[: max(0, len(found) - keep)]:
        open_store(uri).delete(uri)


def load_checkpoint(uri: str, model: torch.nn.Module, ema: Any, optimizer: Any, scheduler: Any,
                    d: Dist) -> tuple[int, list]:
    """Restore training state and this rank's own RNG state; returns (epochs completed, history).
    An epoch checkpoint without an average (from before EMA) starts the average at its weights."""
    # Our own checkpoint under the run's prefix: it holds RNG state objects, hence weights_only=False.
    state = torch.load(io.BytesIO(open_store(uri).get_bytes(uri)), map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    if ema is not None:
        if state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        else:
            ema.set(model)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    if isinstance(rng, dict):  # written by a single process before per-rank states
        rng = [rng]
    if len(rng) == d.world:
        set_rng_state(rng[d.rank])
    else:  # another world size: a fresh, distinct stream per rank, still reproducible
        seed = hash((int(state["epoch"]), d.rank)) % 2**31
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)
    return int(state["epoch"]), list(state["history"])


# ---------------------------------------------------------------------------
# loop


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum(targets * log_softmax(logits))``."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def data_loss(logits: torch.Tensor, targets: torch.Tensor, n_labeled: int, weighting: str = "ratio") -> torch.Tensor:
    """The step's loss: labeled rows first, then pseudo-labeled rows. ``ratio`` (official):
    ``(labeled·B + pseudo·U) / B`` for B labeled and U pseudo-labeled rows; ``equal``: ``labeled + pseudo``."""
    loss = soft_cross_entropy(logits[:n_labeled], targets[:n_labeled])
    n_pseudo = len(targets) - n_labeled
    if n_pseudo:
        weight = n_pseudo / n_labeled if weighting == "ratio" else 1.0
        loss = loss + weight * soft_cross_entropy(logits[n_labeled:], targets[n_labeled:])
    return loss


def to_input(x: torch.Tensor, mean: list[float], std: list[float], d: Dist) -> torch.Tensor:
    """uint8 batch → normalised float batch on the device, channels_last."""
    x = imgs.normalize(x.to(d.device, non_blocking=True), mean, std)
    return x.contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, validation: Stream, images: int, image_size: int, targets: LabeledTargets,
             mean: list[float], std: list[float], d: Dist,
             corruption: tuple[str, int, Sequence[float]] | None = None) -> dict[str, float]:
    """Top-1/top-5 (fractions) on the first ``images`` validation images; each rank scores its 1/W of them.
    ``corruption`` (name, severity, levels) scores corrupted copies of them instead (:mod:`.corruptions`)."""
    was_training = model.training
    model.eval()
    lo, hi = _rank_range(min(images, validation.total), d.world, d.rank)
    counts = torch.zeros(3, dtype=torch.float64, device=d.device)
    position = lo
    for samples, x in ImageBatches(validation, EVAL_BATCH, image_size, positions=(lo, hi)):
        if corruption is not None:
            name, severity, levels = corruption
            x = corrupt(x, name, severity, position, levels)
        position += len(samples)
        y = targets.labels(samples).to(d.device)
        with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=d.device.type == "cuda"):
            logits = model(to_input(x, mean, std, d))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y[:, None]
        counts += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(), torch.tensor(len(y), device=d.device)]).double()
    if d.world > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    n = max(1.0, float(counts[2]))
    return {"top1": float(counts[0]) / n, "top5": float(counts[1]) / n, "validation_images": int(counts[2])}


def corruption_scores(model: torch.nn.Module, validation: Stream, images: int, image_size: int,
                      targets: LabeledTargets, mean: list[float], std: list[float], d: Dist,
                      corruptions: dict[str, list[float]]) -> dict[str, Any]:
    """Top-1 on corrupted copies of the first ``images`` validation images: per corruption (name → its
    parameter per severity), one value per severity, and their mean over everything (``corruption_top1``)."""
    per = {name: [evaluate(model, validation, images, image_size, targets, mean, std, d, (name, severity, levels))
                  ["top1"] for severity in range(1, len(levels) + 1)] for name, levels in corruptions.items()}
    return {"corruption_top1": float(np.mean([v for values in per.values() for v in values])),
            "corruption": per, "corruption_images": min(images, validation.total)}


def _rank_range(total: int, world: int, rank: int) -> tuple[int, int]:
    return total * rank // world, total * (rank + 1) // world


def train_epoch(
    model: torch.nn.Module, batches: Any, optimizer: Any, scheduler: Any, first_update: int,
    mean: list[float], std: list[float], d: Dist, epoch: int, weighting: str = "ratio",
    ema: Any = None, raw: torch.nn.Module | None = None, on_step: Callable[[int, int], None] | None = None,
) -> tuple[float, int]:
    """One epoch; returns (the job's mean loss, images this rank trained on). Raises
    :class:`NonFiniteLoss` on every rank when any rank's loss was not finite.

    ``on_step(steps, images)`` is called after every step (progress).
    """
    model.train()
    total_loss = torch.zeros((), dtype=torch.float64, device=d.device)  # summed on the device: no sync per step
    images, update, steps = 0, first_update, 0
    for x, y, n_labeled in batches:
        x = to_input(x, mean, std, d)
        y = y.to(d.device, non_blocking=True)
        with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=d.device.type == "cuda"):
            logits = model(x)
        loss = data_loss(logits, y, n_labeled, weighting)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update += 1
        if ema is not None:
            ema.update(raw, step=update)
        scheduler.step_update(num_updates=update)
        total_loss += loss.detach()
        images += len(y)
        steps += 1
        if on_step is not None:
            on_step(steps, images)
    if d.world > 1:
        # Every rank decides on the job's mean loss: a rank stopping alone would leave the others
        # waiting for it in evaluation's all_reduce until the process group times out.
        dist.all_reduce(total_loss)
        total_loss /= d.world
    mean_loss = float(total_loss) / max(1, steps)
    if not math.isfinite(mean_loss):
        lr = optimizer.param_groups[0]["lr"]
        raise NonFiniteLoss(f"loss: not finite ({mean_loss}) in epoch {epoch + 1} (learning rate {lr:.3g}); "
                            "training stopped before this epoch's checkpoint, no weights were saved from it "
                            "(lower lr, or add warmup_epochs)")
    return mean_loss, images


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train as configured; returns the metrics (also written to ``metrics.json``)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    d = init_distributed()
    cores = CoreShare()
    threads, workers = cores.plan(cfg.workers)
    if d.device.type == "cuda":
        workers = cfg.workers  # the GPU computes; every core is free for data
    else:
        torch.set_num_threads(threads)
    out = cfg.output
    torch.manual_seed(cfg.seed + d.rank)
    np.random.seed(cfg.seed + d.rank)
    random.seed(cfg.seed + d.rank)
    if cfg.batch_size < d.world:
        raise ConfigError(f"batch_size: {cfg.batch_size} is smaller than the {d.world} training processes")
    check_optimizer(cfg.optimizer)
    model, parameters = build_model(cfg)  # cheap checks first, before any data is read
    if cfg.init is not None and latest_checkpoint(out) is None:  # a resumed run has its own weights
        start_from(cfg.init, model, cfg.model, cfg.num_classes, cfg.model_args)
        event("init", checkpoint=cfg.init)
    digests: dict[str, str] = {}
    if d.main:
        put_json(join_uri(out, "config.json"), cfg.model_dump(mode="json"), digests)

    # data
    labeled = open_set(cfg.labeled, "labeled", cfg, shuffle=True)
    validation = open_set(cfg.validation, "validation", cfg, shuffle=False)
    test = open_set(cfg.test, "test", cfg, shuffle=False) if cfg.test else None
    streams, batches = [labeled], [cfg.batch_size]
    targets: list[Any] = [LabeledTargets(cfg.num_classes, "labeled", cfg.label_smoothing)]
    if cfg.pseudo is not None:
        copies = open_manifest(cfg.pseudo, cfg)
        streams.append(open_set(cfg.pseudo.unlabeled, "pseudo.unlabeled", cfg, shuffle=True, copies=copies))
        batches.append(cfg.pseudo.ratio * cfg.batch_size)
        targets.append(PseudoTargets(cfg.num_classes, cfg.pseudo.type, cfg.pseudo.temperature, cfg.label_smoothing))
    steps = max(math.ceil(s.total / b) for s, b in zip(streams, batches))
    augment = None
    if cfg.noise.rand_augment is not None:
        ra = cfg.noise.rand_augment
        augment = imgs.rand_augment(ra.ops, ra.magnitude, cfg.image_size,
                                    fill_colour(ra.fill, labeled, cfg.image_size), ra.magnitude_max)
    event("data", labeled=labeled.total, pseudo=streams[1].total if len(streams) > 1 else 0,
          validation=validation.total, steps_per_epoch=steps, threads=torch.get_num_threads(), workers=workers)

    # model
    model.to(d.device, memory_format=torch.channels_last)
    mean, std = normalization(model)
    ema = weight_ema(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    scored = ema.module if ema is not None else model  # the weights evaluated, saved for labeling, resumed
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if d.world > 1 else model
    step_model = torch.compile(ddp_model) if cfg.compile else ddp_model

    # optimizer
    optimizer = create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.9)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.lr * 0.01, min_lr=cfg.lr * 0.001, step_on_epochs=False, updates_per_epoch=steps,
    )
    start, history = 0, []
    resume_uri = latest_checkpoint(out)
    if resume_uri is not None:
        start, history = load_checkpoint(resume_uri, model, ema, optimizer, scheduler, d)
        event("resume", epoch=start, epochs=cfg.epochs, checkpoint=resume_uri)

    # loop
    data = TrainBatches(streams, batches, steps, d.rank, d.world, cfg.seed, start, cfg.image_size, targets,
                        augment, padding=cfg.image_size // 8, hflip=cfg.hflip)
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
        pin_memory=d.device.type == "cuda", prefetch_factor=4 if workers > 0 else None,
    )
    label_targets = LabeledTargets(cfg.num_classes, "validation")
    progress = ProgressFile(join_uri(out, "progress.json"), cfg.epochs, start) if d.main else None
    if progress is not None and history:
        progress.top1 = history[-1]["top1"]
    for epoch in range(start, cfg.epochs):
        tic = time.perf_counter()

        def on_step(step: int, images: int, epoch: int = epoch, tic: float = tic) -> None:
            if progress is not None:
                progress.update(epoch + step / steps, images * d.world / max(time.perf_counter() - tic, 1e-9))

        try:
            loss, seen = train_epoch(step_model, loader, optimizer, scheduler, epoch * steps, mean, std, d, epoch,
                                     cfg.unlabeled_loss_weight, ema, model, on_step)
        except DataError as exc:
            raise unwrap(exc) from None
        seconds = time.perf_counter() - tic
        scheduler.step(epoch + 1)
        last = epoch + 1 == cfg.epochs
        scores = evaluate(scored, validation, validation.total if last else cfg.eval_images, cfg.image_size,
                          label_targets, mean, std, d)
        if last and ema is not None:
            scores["top1_raw"] = evaluate(model, validation, validation.total, cfg.image_size, label_targets,
                                          mean, std, d)["top1"]
        history.append({"epoch": epoch + 1, "loss": loss, **scores, "images": seen * d.world, "seconds": seconds})
        rng = gather_rng(d)
        if d.main:
            save_checkpoint(join_uri(out, "checkpoints", f"epoch-{epoch + 1:03d}.pt"), model, ema, optimizer,
                            scheduler, epoch + 1, history, rng)
            prune_checkpoints(out, cfg.keep_checkpoints)
            progress.update(epoch + 1, seen * d.world / seconds, scores["top1"], force=True)
        event("epoch", epoch=epoch + 1, epochs=cfg.epochs, loss=round(loss, 4), top1=round(scores["top1"], 4),
              images_per_second=round(seen * d.world / seconds, 1))
        barrier(d)

    # metrics
    final = history[-1] if history else evaluate(scored, validation, validation.total, cfg.image_size,
                                                 label_targets, mean, std, d)
    held_out = test or validation  # the test split when there is one: nothing was chosen by it
    scores: dict[str, Any] = {}
    if test is not None:
        test_scores = evaluate(scored, test, test.total, cfg.image_size, LabeledTargets(cfg.num_classes, "test"),
                               mean, std, d)
        scores = {"test_top1": test_scores["top1"], "test_top5": test_scores["top5"],
                  "test_images": test_scores["validation_images"]}
    if cfg.corruption_images and cfg.corruptions:
        scores.update(corruption_scores(scored, held_out, cfg.corruption_images, cfg.image_size,
                                        LabeledTargets(cfg.num_classes, "test" if test else "validation"),
                                        mean, std, d, cfg.corruptions))
    train_seconds = sum(h["seconds"] for h in history)
    metrics = {
        "role": cfg.role,
        "model": cfg.model,
        "model_args": cfg.model_args,
        "top1": final["top1"],
        "top5": final["top5"],
        "top1_raw": final.get("top1_raw", final["top1"]),
        "weights": "ema" if ema is not None else "state_dict",
        "parameters": parameters,
        "images_per_second": sum(h["images"] for h in history) / train_seconds if train_seconds else 0.0,
        "epochs": cfg.epochs,
        "labeled_images": labeled.total,
        "pseudo_images": streams[1].total if len(streams) > 1 else 0,
        "world_size": d.world,
        "validation_images": final["validation_images"],
        **scores,
        "history": [{k: h[k] for k in ("epoch", "loss", "top1", "top5", "validation_images")} for h in history],
    }
    if d.main:
        checkpoint_uri = join_uri(out, "checkpoint.pt")
        digests[checkpoint_uri] = sha256(save_final(checkpoint_uri, model, cfg.model, cfg.num_classes, cfg.image_size,
                                                    cfg.model_args, ema.module if ema is not None else None))
        put_json(join_uri(out, "metrics.json"), metrics, digests)
        write_done(out, cfg.role, {k: v for k, v in metrics.items() if k != "history"}, digests)
    barrier(d)
    cores.close()
    if d.world > 1:
        dist.destroy_process_group()
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    return run_entry_point(
        "Train a Noisy Student teacher or student.", TrainConfig, lambda cfg, _: run(cfg), argv,
        quiet=int(os.environ.get("RANK", "0")) != 0,
    )


if __name__ == "__main__":
    sys.exit(main())
