"""Throughput of the train and label workloads against bare streaming loops — a benchmark, not a test.

Same shards, model, noise, threads, workers and machine, in one run. The
workload side is the real entry points on packed shards: a teacher epoch,
``label.run``, ``balance.run``, then the noisy student (``train.run`` with
RandAugment, dropout and stochastic depth, labeled + pseudo-labeled batches).
The bare side is the textbook loop on the same shards:

* train: ``webdataset.WebDataset(shards).shuffle().decode("pil")`` → the same
  RandAugment and crop in the same number of DataLoader workers → the timm
  model with the same dropout and stochastic depth, forward / soft
  cross-entropy / backward / SGD step, batches of ``(1 + ratio) × batch``.
  Compared with the student's own ``images_per_second`` (its training
  loop: data pipeline, crop, scheduler included; evaluation and checkpoints
  excluded).
* label: ``webdataset.WebDataset(shards).decode("pil")`` → eval transform →
  ``model.eval()`` + softmax, against the label stage's own loop (read,
  checks, decode, predict; its ``images_per_second``) and end to end (model
  load, worker start, parts, stats and markers included).

Runs alternate (workload, bare, bare, workload, ...) so that drifting machine
load hits both sides alike; the table shows medians over ``--rounds``, and
the ratio is the median of each round's own ratio (its two sides ran next to
each other in time: on a shared machine whose load swings several-fold
within minutes, a ratio of medians compares moments far apart), with the
host's load average (1 min) sampled as it ran.

Command line::

    nice python bench/throughput.py --source mnist --model resnet18 --image-size 32 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import noisy_student_workloads  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)
import torch
import torch.nn.functional as F
import webdataset as wds
from noisy_student_workloads import balance, label, train
from noisy_student_workloads import images as imgs
from noisy_student_workloads.config import BalanceConfig, LabelConfig, NoiseConfig, RandAugmentConfig, TrainConfig
from noisy_student_workloads.datasets import pack_dataset
from noisy_student_workloads.models import create_model, normalization
from noisy_student_workloads.runtime import CoreShare
from noisy_student_workloads.store import expand_shards


def local_paths(pattern: str) -> list[str]:
    return [u.removeprefix("file://") for u in expand_shards(pattern)]


class BareTrain(torch.utils.data.IterableDataset):
    """WebDataset's own pipeline with the student's input noise."""

    def __init__(self, paths: list[str], batch: int, image_size: int, augment, steps: int) -> None:
        self.paths, self.batch, self.image_size, self.augment, self.steps = paths, batch, image_size, augment, steps

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        steps = self.steps // (info.num_workers if info else 1)
        ds = (wds.WebDataset(self.paths, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker)
              .repeat().shuffle(1000).decode("pil"))
        it = iter(ds)
        pad = self.image_size // 8
        for _ in range(steps):
            xs = []
            for _ in range(self.batch):
                img = next(it)["png"].convert("RGB").resize((self.image_size, self.image_size))
                xs.append(torch.from_numpy(imgs.np.asarray(self.augment(img)).copy()).permute(2, 0, 1))
            yield imgs.random_crop(torch.stack(xs), pad)


def bare_train(paths: list[str], cfg: TrainConfig, steps: int, threads: int, workers: int) -> float:
    """Images/s of the bare streaming training loop."""
    torch.set_num_threads(threads)
    model = create_model(cfg.model, cfg.num_classes, cfg.noise.dropout, cfg.noise.stochastic_depth)
    model = model.to(memory_format=torch.channels_last).train()
    mean, std = normalization(model)
    ra = cfg.noise.rand_augment
    augment = imgs.rand_augment(ra.ops, ra.magnitude, cfg.image_size, [0, 0, 0])
    batch = (1 + cfg.pseudo.ratio) * cfg.batch_size
    steps -= steps % max(1, workers)
    loader = torch.utils.data.DataLoader(BareTrain(paths, batch, cfg.image_size, augment, steps), batch_size=None,
                                         num_workers=workers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-5)
    targets = torch.full((batch, cfg.num_classes), 1.0 / cfg.num_classes)
    tic, n = time.perf_counter(), 0
    for x in loader:
        x = imgs.normalize(x, mean, std).contiguous(memory_format=torch.channels_last)
        loss = -(targets * F.log_softmax(model(x), dim=1)).sum(dim=1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n += len(x)
    return n / (time.perf_counter() - tic)


@torch.inference_mode()
def bare_label(paths: list[str], model_name: str, image_size: int, batch: int, threads: int) -> tuple[float, int]:
    """Images/s of the bare streaming eval loop (softmax), and the images seen."""
    torch.set_num_threads(threads)
    model = create_model(model_name, 10).eval().to(memory_format=torch.channels_last)
    mean, std = normalization(model)
    ds = wds.WebDataset(paths, shardshuffle=False, nodesplitter=None, workersplitter=None).decode("pil")
    tic, n, chunk = time.perf_counter(), 0, []

    def run(chunk: list) -> None:
        x = imgs.normalize(torch.stack(chunk), mean, std).contiguous(memory_format=torch.channels_last)
        torch.softmax(model(x), dim=1)

    for sample in ds:
        img = sample["png"].convert("RGB").resize((image_size, image_size))
        chunk.append(torch.from_numpy(imgs.np.asarray(img).copy()).permute(2, 0, 1))
        if len(chunk) == batch:
            run(chunk)
            n, chunk = n + len(chunk), []
    if chunk:
        run(chunk)
        n += len(chunk)
    return n / (time.perf_counter() - tic), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="mnist", help="pack_dataset source (digits, mnist, ...)")
    parser.add_argument("--labels-per-class", type=int, default=50)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ratio", type=int, default=3, help="pseudo-labeled images per labeled image in a step")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    root = Path(tempfile.mkdtemp(prefix="ns-bench-"))
    patterns = pack_dataset(args.source, f"file://{root}/data/", args.labels_per_class, 0, 1000)["patterns"]
    noise = NoiseConfig(rand_augment=RandAugmentConfig(ops=2, magnitude=9), dropout=0.5, stochastic_depth=0.2)
    base = dict(model=args.model, num_classes=10, image_size=args.image_size, labeled=patterns["labeled"],
                validation=patterns["validation"], batch_size=args.batch_size, lr=0.05, eval_images=200)
    # a teacher to label with, once (not measured)
    teacher_out = f"file://{root}/teacher/"
    train.run(TrainConfig(role="teacher", epochs=1, output=teacher_out, **base))
    unlabeled_paths = local_paths(patterns["unlabeled"])

    share = CoreShare()
    threads, workers = share.plan(2)
    share.close()
    results: dict[str, list[float]] = {k: [] for k in ("train", "bare_train", "label", "label_wall", "bare_label")}
    loads = []
    for round_ in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for side in (["workload", "bare"] if round_ % 2 == 0 else ["bare", "workload"]):
            out = f"file://{root}/run-{round_}/"
            if side == "workload":
                tic = time.perf_counter()
                label.run(LabelConfig(checkpoint=teacher_out + "checkpoint.pt", unlabeled=patterns["unlabeled"],
                                      output=out + "labels/"), 0, 1)
                part = json.loads(Path(root, f"run-{round_}/labels/part-00000.done.json").read_text())
                results["label_wall"].append(part["images"] / (time.perf_counter() - tic))
                results["label"].append(part["images_per_second"])
                balance.run(BalanceConfig(labels=out + "labels/", num_classes=10, confidence_threshold=0.0,
                                          output=out + "balance/"))
                student = TrainConfig(
                    role="student", epochs=1, output=out + "student/", noise=noise,
                    pseudo={"manifest": out + "balance/manifest.json", "unlabeled": patterns["unlabeled"],
                            "ratio": args.ratio}, **base)
                metrics = train.run(student)
                resolved = Path(root, f"run-{round_}/student/config.json").read_text()
                if TrainConfig.model_validate_json(resolved).noise != noise:  # what the student really ran with
                    raise RuntimeError("the student did not train with the benchmark's noise")
                results["train"].append(metrics["images_per_second"])
                steps = -(-metrics["pseudo_images"] // (args.ratio * args.batch_size))
            else:
                results["bare_label"].append(bare_label(unlabeled_paths, args.model, args.image_size, 256, threads)[0])
                student_cfg = TrainConfig(
                    role="student", epochs=1, output=out, noise=noise,
                    pseudo={"manifest": "unused", "unlabeled": patterns["unlabeled"], "ratio": args.ratio}, **base)
                bare_steps = steps if results["train"] else 40
                results["bare_train"].append(bare_train(unlabeled_paths, student_cfg, bare_steps, threads, workers))

    loads.append(os.getloadavg()[0])
    med = {k: statistics.median(v) for k, v in results.items()}
    device = "cuda" if torch.cuda.is_available() else f"cpu, {threads} threads + {workers} data workers per process"
    rows = [(name, med[w], med[b], [x / y for x, y in zip(results[w], results[b])]) for name, w, b in (
        ("student train (loop)", "train", "bare_train"),
        ("label (loop)", "label", "bare_label"),
        ("label (end to end)", "label_wall", "bare_label"),
    )]
    lines = [
        f"model {args.model} @ {args.image_size}px, {args.source}: noise (both sides) RandAugment "
        f"{noise.rand_augment.ops}/{noise.rand_augment.magnitude}, dropout {noise.dropout}, stochastic depth "
        f"{noise.stochastic_depth}; batch {args.batch_size} + {args.ratio}x pseudo; {args.rounds} rounds; {device}",
        f"{'':24} {'workload img/s':>15} {'bare img/s':>11} {'ratio':>6} {'per round':>9}",
    ]
    lines += [f"{name:24} {w:15.1f} {b:11.1f} {statistics.median(r):6.2f} {min(r):.2f}-{max(r):.2f}"
              for name, w, b, r in rows]
    lines.append(f"host load average (1 min) while it ran: mean {statistics.mean(loads):.1f}, max {max(loads):.1f}")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"median": med, "all": results, "threads": threads,
                                               "workers": workers}, indent=2))


if __name__ == "__main__":
    main()
