"""Train a teacher, or a noisy student on labeled + pseudo-labeled images.

Started by torchrun inside a TorchX job (one process per device); works the
same as a single plain process. Reads one config (see
:class:`noisy_student_workloads.config.TrainConfig`), writes ``config.json``,
``progress.json``, ``checkpoints/epoch-NNN.pt`` every epoch, the final
``checkpoint.pt`` and ``metrics.json``, then ``_DONE.json`` last.

Recipe:

* **Steps.** Each step draws a labeled batch of ``batch_size`` images and,
  for a student, a pseudo-labeled batch of ``ratio × batch_size`` images.
  An epoch is as many steps as it takes to see the larger of the two sets
  once; the smaller one cycles. ``batch_size`` is global: with W processes
  each takes every W-th image of the step's batch (rank-strided sharding).
* **Loss.** Cross-entropy on the labeled batch plus soft cross-entropy on the
  pseudo-labeled batch (each a mean, so ``ratio`` changes how many pseudo
  labels a step sees, not how much labeled data weighs). Soft targets are the
  teacher's distribution re-tempered as ``p^(1/T)`` normalised (the same as
  ``softmax(logits / T)``); hard targets are its argmax.
* **Noise.** Input: timm RandAugment when ``noise.rand_augment`` is set, plus
  a small random crop for every training image. Model: dropout before the
  classifier (``drop_rate``) and stochastic depth (``drop_path_rate``).
* **Schedule.** timm optimizer factory (``sgd`` is SGD with Nesterov
  momentum 0.9) and a per-step cosine schedule with linear warm-up.
* **Metrics.** ``top1``/``top5`` (fractions) of the final model on the whole
  validation set; earlier epochs in ``history`` are scored on a fixed subset
  of at most 2,000 validation images, for progress only.
* **Restarts.** At start the latest ``checkpoints/epoch-NNN.pt`` is loaded
  (model, optimizer, scheduler, RNG, history) and training continues at the
  next epoch; data order depends only on (seed, epoch), so a resumed run
  sees the same batches an uninterrupted one would.

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import images as imgs
from .config import ConfigError, PseudoConfig, TrainConfig
from .models import count_parameters, create_model, normalization, save_final
from .stage import cpu_threads, event, put, put_json, run_entry_point, sha256, write_done
from .store import join_uri, open_store

EVAL_BATCH = 512
# Intermediate epochs are scored on a fixed random subset of at most this many
# validation images (progress only); the last epoch on the whole set. With few
# labels a full pass over a large validation set would cost more than training.
PROGRESS_EVAL_IMAGES = 2000
_CHECKPOINT = re.compile(r"epoch-(\d+)\.pt$")


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
    else:
        device = torch.device("cpu")
        torch.set_num_threads(cpu_threads(local_world))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world, local_world, device)


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


# ---------------------------------------------------------------------------
# data


@dataclass
class Source:
    """Images to draw training batches from: a pool of indices (with duplicates) and soft targets."""

    images: torch.Tensor  # uint8 N×C×S×S
    targets: torch.Tensor  # float N×K, rows sum to 1
    pool: torch.Tensor  # int64 indices into images; a balanced set repeats some


def load_labeled(pattern: str, field: str, cfg: TrainConfig) -> imgs.ImageSet:
    """Labeled shards, checked against ``num_classes``; errors name ``field``."""
    try:
        data = imgs.load_image_set(pattern, cfg.image_size)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"{field}: {exc}") from None
    if len(data) == 0:
        raise ConfigError(f"{field}: no images in {pattern}")
    if bool((data.labels < 0).any()):
        raise ConfigError(f"{field}: {pattern} holds unlabeled images (no .cls)")
    top = int(data.labels.max())
    if top >= cfg.num_classes:
        raise ConfigError(f"num_classes: {cfg.num_classes} but {field} has class {top}")
    return data


def tempered(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Re-temper a distribution: ``p^(1/T)`` normalised, i.e. ``softmax(logits / T)``."""
    p = probs.astype(np.float64)
    if temperature != 1.0:
        p = np.power(np.clip(p, 1e-12, None), 1.0 / temperature)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def manifest_targets(manifest: dict[str, np.ndarray], num_classes: int, kind: str, temperature: float) -> np.ndarray:
    """Targets (N×K float) from a balance manifest: one-hot for ``hard``, re-tempered for ``soft``."""
    classes = manifest["classes"].astype(np.int64)
    if kind == "hard":
        return np.eye(num_classes, dtype=np.float32)[classes]
    if "probs" in manifest:
        probs = manifest["probs"].astype(np.float32)
    else:  # top-k only (many classes): the rest of the mass is unknown, renormalise over the top k
        probs = np.zeros((len(classes), num_classes), dtype=np.float32)
        np.put_along_axis(probs, manifest["topk_indices"].astype(np.int64), manifest["topk_values"].astype(np.float32), 1)
    if probs.shape[1] != num_classes:
        raise ConfigError(f"num_classes: {num_classes} but the pseudo-label manifest has {probs.shape[1]} classes")
    return tempered(probs, temperature)


def load_pseudo(pseudo: PseudoConfig, cfg: TrainConfig) -> Source:
    """The balanced pseudo-labeled set: manifest targets joined by key with the unlabeled images."""
    try:
        raw = open_store(pseudo.manifest).get_bytes(pseudo.manifest)
    except FileNotFoundError as exc:
        raise ConfigError(f"pseudo.manifest: {exc}") from None
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        manifest = {k: z[k] for k in z.files}
    if len(manifest.get("keys", ())) == 0:
        raise ConfigError(f"pseudo.manifest: {pseudo.manifest} selects no images")
    try:
        unlabeled = imgs.load_image_set(pseudo.unlabeled, cfg.image_size)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"pseudo.unlabeled: {exc}") from None
    position = {k: i for i, k in enumerate(unlabeled.keys)}
    missing = [str(k) for k in manifest["keys"] if str(k) not in position]
    if missing:
        raise ConfigError(f"pseudo.unlabeled: {len(missing)} manifest keys not found, e.g. {missing[0]!r}")
    rows = torch.tensor([position[str(k)] for k in manifest["keys"]], dtype=torch.int64)
    targets = torch.from_numpy(manifest_targets(manifest, cfg.num_classes, pseudo.type, pseudo.temperature))
    copies = torch.from_numpy(manifest["copies"].astype(np.int64))
    pool = torch.repeat_interleave(torch.arange(len(rows)), copies)
    return Source(unlabeled.images[rows], targets, pool)


def plan_batches(pool_size: int, global_batch: int, steps: int, d: Dist, seed: int) -> torch.Tensor:
    """Steps × (this rank's share of ``global_batch``) positions into a pool, cycling through permutations."""
    g = torch.Generator().manual_seed(seed)
    need = steps * global_batch
    perms = [torch.randperm(pool_size, generator=g) for _ in range(math.ceil(need / pool_size))]
    return torch.cat(perms)[:need].view(steps, global_batch)[:, d.rank :: d.world]


class StepBatches(torch.utils.data.Dataset):
    """Item ``i`` is step ``i``'s batch: uint8 images (3 channels), float targets, labeled count."""

    def __init__(self, sources: Sequence[Source], plans: Sequence[torch.Tensor], augment: Any, padding: int) -> None:
        self.sources, self.plans, self.augment, self.padding = list(sources), list(plans), augment, padding

    def __len__(self) -> int:
        return len(self.plans[0])

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        xs, ys = [], []
        for source, plan in zip(self.sources, self.plans):
            rows = source.pool[plan[step]]
            x = source.images[rows]
            if self.augment is not None:
                x = torch.stack([self.augment(img) for img in x])
            elif x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            xs.append(imgs.random_crop(x, self.padding))
            ys.append(source.targets[rows])
        return torch.cat(xs), torch.cat(ys), len(self.plans[0][step])


# ---------------------------------------------------------------------------
# model


def build_model(cfg: TrainConfig) -> tuple[torch.nn.Module, int]:
    """The timm model with the config's model noise; refuses a student smaller than its teacher."""
    model = create_model(cfg.model, cfg.num_classes, cfg.noise.dropout, cfg.noise.stochastic_depth)
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


# ---------------------------------------------------------------------------
# checkpoints


def latest_checkpoint(output: str) -> str | None:
    """URI of the highest ``checkpoints/epoch-NNN.pt`` under ``output``, if any."""
    prefix = join_uri(output, "checkpoints/")
    found = [(int(m.group(1)), u) for u in open_store(prefix).list(prefix) if (m := _CHECKPOINT.search(u))]
    return max(found)[1] if found else None


def save_checkpoint(uri: str, model: torch.nn.Module, optimizer: Any, scheduler: Any, epoch: int, history: list) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "history": history,
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    put(uri, buf.getvalue())


def load_checkpoint(uri: str, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> tuple[int, list]:
    """Restore training state; returns (epochs completed, history)."""
    # Our own checkpoint under the run's prefix: it holds RNG state objects, hence weights_only=False.
    state = torch.load(io.BytesIO(open_store(uri).get_bytes(uri)), map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return int(state["epoch"]), list(state["history"])


# ---------------------------------------------------------------------------
# loop


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum(targets * log_softmax(logits))``."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


@torch.inference_mode()
def evaluate(model: torch.nn.Module, data: imgs.ImageSet, mean: list[float], std: list[float], d: Dist,
             subset: torch.Tensor | None = None) -> dict[str, float]:
    """Top-1/top-5 (fractions) on ``data`` (or its ``subset`` rows); each rank scores every W-th image."""
    was_training = model.training
    model.eval()
    rows = (torch.arange(len(data)) if subset is None else subset)[d.rank :: d.world]
    counts = torch.zeros(3, dtype=torch.float64, device=d.device)
    for chunk in rows.split(EVAL_BATCH):
        x = imgs.normalize(data.images[chunk].to(d.device, non_blocking=True), mean, std)
        y = data.labels[chunk].to(d.device)
        with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=d.device.type == "cuda"):
            logits = model(x)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y[:, None]
        counts += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(), torch.tensor(len(y), device=d.device)]).double()
    if d.world > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    n = max(1.0, float(counts[2]))
    return {"top1": float(counts[0]) / n, "top5": float(counts[1]) / n, "validation_images": int(counts[2])}


def train_epoch(
    model: torch.nn.Module, loader: Any, optimizer: Any, scheduler: Any, first_update: int,
    mean: list[float], std: list[float], d: Dist,
) -> tuple[float, int]:
    """One epoch; returns (mean loss, images this rank trained on)."""
    model.train()
    total_loss, images, update = 0.0, 0, first_update
    for step, (x, y, n_labeled) in enumerate(loader):
        x = imgs.normalize(x.to(d.device, non_blocking=True), mean, std)
        y = y.to(d.device, non_blocking=True)
        with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=d.device.type == "cuda"):
            logits = model(x)
        loss = soft_cross_entropy(logits[:n_labeled], y[:n_labeled])
        if len(y) > n_labeled:
            loss = loss + soft_cross_entropy(logits[n_labeled:], y[n_labeled:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update += 1
        scheduler.step_update(num_updates=update)
        total_loss += float(loss.detach())
        images += len(y)
    return total_loss / max(1, step + 1), images


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train as configured; returns the metrics (also written to ``metrics.json``)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    d = init_distributed()
    out = cfg.output
    torch.manual_seed(cfg.seed + d.rank)
    np.random.seed(cfg.seed + d.rank)
    random.seed(cfg.seed + d.rank)
    if cfg.batch_size < d.world:
        raise ConfigError(f"batch_size: {cfg.batch_size} is smaller than the {d.world} training processes")
    check_optimizer(cfg.optimizer)
    model, parameters = build_model(cfg)  # cheap checks first, before any data is read
    digests: dict[str, str] = {}
    if d.main:
        put_json(join_uri(out, "config.json"), cfg.model_dump(mode="json"), digests)

    # data
    labeled = load_labeled(cfg.labeled, "labeled", cfg)
    validation = load_labeled(cfg.validation, "validation", cfg)
    eye = torch.eye(cfg.num_classes)
    sources = [Source(labeled.images, eye[labeled.labels], torch.arange(len(labeled)))]
    batches = [cfg.batch_size]
    if cfg.pseudo is not None:
        sources.append(load_pseudo(cfg.pseudo, cfg))
        batches.append(cfg.pseudo.ratio * cfg.batch_size)
    steps = max(math.ceil(len(s.pool) / b) for s, b in zip(sources, batches))
    augment = None
    if cfg.noise.rand_augment is not None:
        ra = cfg.noise.rand_augment
        augment = imgs.rand_augment(ra.ops, ra.magnitude, cfg.image_size, imgs.mean_pixel(labeled.images))
    event("data", labeled=len(labeled), pseudo=len(sources[1].pool) if len(sources) > 1 else 0,
          validation=len(validation), steps_per_epoch=steps)

    # model
    model.to(d.device)
    mean, std = normalization(model)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if d.world > 1 else model

    # optimizer
    optimizer = create_optimizer_v2(model, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=0.9)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.lr * 0.01, min_lr=cfg.lr * 0.001, step_on_epochs=False, updates_per_epoch=steps,
    )
    start, history = 0, []
    resume_uri = latest_checkpoint(out)
    if resume_uri is not None:
        start, history = load_checkpoint(resume_uri, model, optimizer, scheduler)
        event("resume", epoch=start, epochs=cfg.epochs, checkpoint=resume_uri)

    # loop
    progress_rows = torch.randperm(len(validation), generator=torch.Generator().manual_seed(cfg.seed))
    progress_rows = progress_rows[:PROGRESS_EVAL_IMAGES].sort().values
    for epoch in range(start, cfg.epochs):
        plans = [plan_batches(len(s.pool), b, steps, d, seed=(cfg.seed * 1_000_003 + epoch) * 2 + i)
                 for i, (s, b) in enumerate(zip(sources, batches))]
        loader = torch.utils.data.DataLoader(
            StepBatches(sources, plans, augment, padding=cfg.image_size // 8),
            batch_size=None, shuffle=False, num_workers=cfg.workers,
            pin_memory=d.device.type == "cuda", persistent_workers=False,
        )
        tic = time.perf_counter()
        loss, seen = train_epoch(ddp_model, loader, optimizer, scheduler, epoch * steps, mean, std, d)
        seconds = time.perf_counter() - tic
        scheduler.step(epoch + 1)
        last = epoch + 1 == cfg.epochs
        scores = evaluate(model, validation, mean, std, d, subset=None if last else progress_rows)
        history.append({"epoch": epoch + 1, "loss": loss, **scores, "images": seen * d.world, "seconds": seconds})
        if d.main:
            save_checkpoint(join_uri(out, "checkpoints", f"epoch-{epoch + 1:03d}.pt"), model, optimizer, scheduler,
                            epoch + 1, history)
            put_json(join_uri(out, "progress.json"), {"epoch": epoch + 1, "epochs": cfg.epochs, "top1": scores["top1"]})
        event("epoch", epoch=epoch + 1, epochs=cfg.epochs, loss=round(loss, 4), top1=round(scores["top1"], 4),
              images_per_second=round(seen * d.world / seconds, 1))
        barrier(d)

    # metrics
    final = history[-1] if history else evaluate(model, validation, mean, std, d)
    train_seconds = sum(h["seconds"] for h in history)
    metrics = {
        "role": cfg.role,
        "model": cfg.model,
        "top1": final["top1"],
        "top5": final["top5"],
        "parameters": parameters,
        "images_per_second": sum(h["images"] for h in history) / train_seconds if train_seconds else 0.0,
        "epochs": cfg.epochs,
        "labeled_images": len(labeled),
        "pseudo_images": len(sources[1].pool) if len(sources) > 1 else 0,
        "world_size": d.world,
        "validation_images": final["validation_images"],
        "history": [{k: h[k] for k in ("epoch", "loss", "top1", "top5", "validation_images")} for h in history],
    }
    if d.main:
        checkpoint_uri = join_uri(out, "checkpoint.pt")
        digests[checkpoint_uri] = sha256(save_final(checkpoint_uri, model, cfg.model, cfg.num_classes, cfg.image_size))
        put_json(join_uri(out, "metrics.json"), metrics, digests)
        write_done(out, cfg.role, {k: v for k, v in metrics.items() if k != "history"}, digests)
    barrier(d)
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
