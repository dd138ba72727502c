"""Throughput of the train and label workloads against bare timm loops — a benchmark, not a test.

Same model, same images, same machine, one process. The workload runs are
the real entry points (``train.run`` / ``label.run``) on packed shards; the
bare loops are the textbook timm loops on tensors already in memory:

* train: ``create_model`` + SGD, forward / soft cross-entropy / backward /
  step on random batches of the normalised labeled images. Compared with the
  workload's own ``images_per_second`` (its training loop: data pipeline,
  crop, scheduler, included; evaluation and checkpoints excluded) and with its
  end-to-end wall clock (decoding shards, per-epoch evaluation, checkpoints
  and markers included).
* label: ``model.eval()`` + softmax over the normalised unlabeled images,
  against the label stage's wall clock (decode, predict, write parts, stats
  and markers).

Runs alternate (workload, bare, bare, workload, ...) so that drifting machine
load hits both sides alike; the table shows medians over ``--rounds``.

Command line::

    python bench/throughput.py --source digits --model resnet18 --image-size 32 --epochs 2 --rounds 2
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from noisy_student_workloads import images as imgs
from noisy_student_workloads import label, train
from noisy_student_workloads.config import LabelConfig, TrainConfig
from noisy_student_workloads.datasets import pack_dataset
from noisy_student_workloads.models import create_model, normalization
from noisy_student_workloads.stage import cpu_threads


def bare_train(data: imgs.ImageSet, model_name: str, batch: int, steps: int, lr: float) -> float:
    """Images/s of a plain timm training loop on in-memory tensors."""
    model = create_model(model_name, 10)
    mean, std = normalization(model)
    x_all = imgs.normalize(data.images, mean, std)
    y_all = data.labels
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-5)
    model.train()
    tic = time.perf_counter()
    for _ in range(steps):
        rows = torch.randint(0, len(y_all), (batch,))
        loss = F.cross_entropy(model(x_all[rows]), y_all[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - tic)


@torch.inference_mode()
def bare_label(data: imgs.ImageSet, model_name: str, batch: int) -> float:
    """Images/s of a plain timm eval loop (softmax) on in-memory tensors."""
    model = create_model(model_name, 10).eval()
    mean, std = normalization(model)
    x_all = imgs.normalize(data.images, mean, std)
    tic = time.perf_counter()
    for chunk in x_all.split(batch):
        torch.softmax(model(chunk), dim=1)
    return len(x_all) / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="digits", help="pack_dataset source (digits, mnist, ...)")
    parser.add_argument("--labels-per-class", type=int, default=50)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(cpu_threads())

    root = Path(tempfile.mkdtemp(prefix="ns-bench-"))
    patterns = pack_dataset(args.source, f"file://{root}/data/", args.labels_per_class, 0, 1000)["patterns"]
    labeled = imgs.load_image_set(patterns["labeled"], args.image_size)
    unlabeled = imgs.load_image_set(patterns["unlabeled"], args.image_size)
    steps = args.epochs * -(-len(labeled) // args.batch_size)

    results: dict[str, list[float]] = {k: [] for k in ("train", "train_wall", "bare_train", "label", "bare_label")}
    for round_ in range(args.rounds):
        order = ["workload", "bare"] if round_ % 2 == 0 else ["bare", "workload"]
        for side in order:
            if side == "workload":
                out = f"file://{root}/run-{round_}/"
                cfg = TrainConfig(role="teacher", model=args.model, num_classes=10, image_size=args.image_size,
                                  labeled=patterns["labeled"], validation=patterns["validation"], epochs=args.epochs,
                                  batch_size=args.batch_size, lr=0.05, workers=0, output=out + "teacher/")
                tic = time.perf_counter()
                metrics = train.run(cfg)
                results["train_wall"].append(steps * args.batch_size / (time.perf_counter() - tic))
                results["train"].append(metrics["images_per_second"])
                lcfg = LabelConfig(checkpoint=out + "teacher/checkpoint.pt", unlabeled=patterns["unlabeled"],
                                   batch_size=256, output=out + "labels/")
                tic = time.perf_counter()
                label.run(lcfg, 0, 1)
                results["label"].append(len(unlabeled) / (time.perf_counter() - tic))
            else:
                results["bare_train"].append(bare_train(labeled, args.model, args.batch_size, steps, 0.05))
                results["bare_label"].append(bare_label(unlabeled, args.model, 256))

    med = {k: statistics.median(v) for k, v in results.items()}
    device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    rows = [
        ("train (training loop)", med["train"], med["bare_train"]),
        ("train (end to end)", med["train_wall"], med["bare_train"]),
        ("label (end to end)", med["label"], med["bare_label"]),
    ]
    lines = [
        f"model {args.model} @ {args.image_size}px, {args.source}: {len(labeled)} labeled, {len(unlabeled)} unlabeled;"
        f" {args.epochs} epochs, batch {args.batch_size}, {args.rounds} rounds, device {device}",
        f"{'':24} {'workload img/s':>15} {'bare img/s':>11} {'ratio':>6}",
    ]
    lines += [f"{name:24} {w:15.1f} {b:11.1f} {w / b:6.2f}" for name, w, b in rows]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
