"""Pseudo-label unlabeled shards with the teacher — replica i of N.

Replica i labels shards i, i+N, i+2N, ... of the (sorted, expanded)
unlabeled pattern with the teacher in eval mode and the eval transform (no
augmentation, no dropout, no stochastic depth). It writes under ``output``:

* ``part-NNNNN.npz``: ``keys``, ``classes`` (int), ``confidences`` (float32),
  and the soft distribution — ``probs`` (float16 N×K) when there are at most
  100 classes, else ``topk_indices`` / ``topk_values`` (float16, ``topk`` each);
* ``stats-NNNNN.json``: per-class confidence histograms (100 bins over [0, 1])
  and counts of the images predicted as each class;
* ``part-NNNNN.done.json``: this replica's marker (counts, digests).

Then, if all N part markers exist, it writes the stage marker ``_DONE.json``
from the part markers alone, so its content is the same whichever replica
writes it (the last one to finish does; two writing at once write the same).

Command line::

    python -m noisy_student_workloads.label --replica-id 0 --num-replicas 2 --config '{
        "checkpoint": "file:///tmp/run/gen-0/teacher/checkpoint.pt",
        "unlabeled": "file:///tmp/d/unlabeled-{000000..000003}.tar", "output": "file:///tmp/run/gen-1/labels/"}'
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from . import images as imgs
from .balance import BINS, histogram
from .config import ConfigError, LabelConfig
from .models import load_final
from .stage import cpu_threads, event, now, put, put_json, run_entry_point, write_done
from .store import expand_shards, join_uri, open_store

FULL_DISTRIBUTION_MAX_CLASSES = 100


def part_name(replica: int, kind: str) -> str:
    """``part-00003.npz``, ``stats-00003.json``, ``part-00003.done.json``."""
    return {"part": f"part-{replica:05d}.npz", "stats": f"stats-{replica:05d}.json",
            "done": f"part-{replica:05d}.done.json"}[kind]


@torch.inference_mode()
def predict(model: torch.nn.Module, images: torch.Tensor, meta: dict[str, Any], batch_size: int,
            device: torch.device) -> torch.Tensor:
    """Softmax probabilities (float32, N×K) of the model on uint8 images, eval transform only."""
    model.eval().to(device)
    out = []
    for chunk in images.split(batch_size):
        x = imgs.normalize(chunk.to(device, non_blocking=True), meta["mean"], meta["std"])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
        out.append(torch.softmax(logits.float(), dim=1).cpu())
    if not out:
        return torch.zeros((0, int(meta["num_classes"])))
    return torch.cat(out)


def encode_part(keys: Sequence[str], probs: torch.Tensor, topk: int) -> bytes:
    """The ``part-NNNNN.npz`` bytes for these predictions."""
    confidences, classes = probs.max(dim=1) if len(probs) else (torch.zeros(0), torch.zeros(0, dtype=torch.int64))
    arrays: dict[str, np.ndarray] = {
        "keys": np.asarray(list(keys), dtype=np.str_),
        "classes": classes.numpy().astype(np.int32),
        "confidences": confidences.numpy().astype(np.float32),
    }
    if probs.shape[1] <= FULL_DISTRIBUTION_MAX_CLASSES:
        arrays["probs"] = probs.numpy().astype(np.float16)
    else:
        values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
        arrays["topk_indices"] = indices.numpy().astype(np.int32)
        arrays["topk_values"] = values.numpy().astype(np.float16)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def finish_stage(output: str, num_replicas: int) -> dict[str, Any] | None:
    """Write ``_DONE.json`` when all part markers exist; deterministic content, from part markers only."""
    store = open_store(output)
    markers = [join_uri(output, part_name(i, "done")) for i in range(num_replicas)]
    if not all(store.exists(m) for m in markers):
        return None
    parts = [store.get_json(m) for m in markers]
    images = sum(p["images"] for p in parts)
    if images == 0:
        raise ConfigError("unlabeled: the unlabeled set is empty (no images in any shard)")
    per_class = np.sum([p["per_class"] for p in parts], axis=0).tolist()
    digests = {k: v for p in parts for k, v in p["sha256"].items()}
    metrics = {"images": images, "replicas": num_replicas, "shards": sum(len(p["shards"]) for p in parts),
               "per_class": per_class}
    return write_done(output, "label", metrics, digests, finished=max(p["finished"] for p in parts))


def run(cfg: LabelConfig, replica_id: int, num_replicas: int) -> dict[str, Any] | None:
    """Label this replica's shards; returns the stage marker if this replica completed the stage."""
    if num_replicas < 1 or not 0 <= replica_id < num_replicas:
        raise ConfigError(f"--replica-id: {replica_id} is not in [0, {num_replicas})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(cpu_threads())
    out = cfg.output
    if replica_id == 0:
        put_json(join_uri(out, "config.json"), cfg.model_dump(mode="json"))

    # model (first: it fixes image_size and num_classes)
    model, meta = load_final(cfg.checkpoint)

    # data
    try:
        shards = expand_shards(cfg.unlabeled)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"unlabeled: {exc}") from None
    if not shards:
        raise ConfigError(f"unlabeled: {cfg.unlabeled} names no shards")
    mine = shards[replica_id::num_replicas]
    store = open_store(out)
    done_uri = join_uri(out, part_name(replica_id, "done"))
    if store.exists(done_uri):
        previous = store.get_json(done_uri)
        if previous.get("shards") == mine and previous.get("num_replicas") == num_replicas:
            event("skip", replica=replica_id, reason="part already labeled")  # a retried replica
            return finish_stage(out, num_replicas)
    if mine:
        try:
            data = imgs.load_image_set(mine, int(meta["image_size"]))
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"unlabeled: {exc}") from None
        keys, images = data.keys, data.images
    else:  # more replicas than shards: an empty part keeps the stage's bookkeeping uniform
        keys, images = [], torch.zeros((0, 3, 1, 1), dtype=torch.uint8)
    event("data", replica=replica_id, shards=len(mine), images=len(keys))

    # predict
    probs = predict(model, images, meta, cfg.batch_size, device)
    part = encode_part(keys, probs, cfg.topk)
    classes = probs.argmax(dim=1).numpy() if len(probs) else np.zeros(0, dtype=np.int64)
    confidences = probs.max(dim=1).values.numpy() if len(probs) else np.zeros(0, dtype=np.float32)
    num_classes = int(meta["num_classes"])
    hist = histogram(classes, confidences, num_classes)
    stats = {"replica": replica_id, "num_classes": num_classes, "bins": BINS,
             "counts": hist.sum(axis=1).tolist(), "histograms": hist.tolist()}

    # outputs, then this replica's marker, then (maybe) the stage marker
    digests: dict[str, str] = {}
    put(join_uri(out, part_name(replica_id, "part")), part, digests)
    put_json(join_uri(out, part_name(replica_id, "stats")), stats, digests)
    put_json(join_uri(out, part_name(replica_id, "done")), {
        "replica": replica_id, "num_replicas": num_replicas, "images": len(keys), "shards": mine,
        "per_class": stats["counts"], "sha256": digests, "finished": now(),
    })
    event("labeled", replica=replica_id, images=len(keys),
          mean_confidence=round(float(confidences.mean()), 4) if len(keys) else None)
    return finish_stage(out, num_replicas)


def main(argv: Sequence[str] | None = None) -> int:
    def body(cfg: LabelConfig, args: argparse.Namespace) -> None:
        marker = run(cfg, args.replica_id, args.num_replicas)
        if marker is not None:
            event("done", stage="label", images=marker["metrics"]["images"])

    return run_entry_point(
        "Pseudo-label unlabeled shards with a teacher (one replica of N).", LabelConfig, body, argv, replicas=True
    )


if __name__ == "__main__":
    sys.exit(main())
