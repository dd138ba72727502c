"""Pseudo-label unlabeled shards with the teacher — replica i of N.

Replica i labels shards i, i+N, i+2N, ... of the (sorted, expanded)
unlabeled pattern with the teacher in eval mode and the eval transform (no
augmentation, no dropout, no stochastic depth). Shards are streamed with
read-ahead (:mod:`.pipeline`); only the predictions, in compact arrays, are
kept. It writes under ``output``:

* ``part-NNNNN.npz``: ``keys`` (bytes), ``classes`` (int), ``confidences``
  (float32), ``shard`` (index into ``shard_names``, the file names of all
  unlabeled shards), and the soft distribution — ``probs`` (float16 N×K)
  when there are at most 100 classes, else ``topk_indices`` /
  ``topk_values`` (float16, ``topk`` each);
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
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import images as imgs
from .balance import BINS, histogram
from .config import ConfigError, LabelConfig
from .models import load_final
from .pipeline import Copies, DataError, ImageBatches, ShardCatalog, Stream, unwrap
from .runtime import CoreShare
from .stage import event, now, put, put_json, run_entry_point, write_done
from .store import expand_shards, join_uri, open_store

FULL_DISTRIBUTION_MAX_CLASSES = 100
# Batches between re-reading how many label replicas share this host's cores.
RETHREAD_EVERY = 20


def part_name(replica: int, kind: str) -> str:
    """``part-00003.npz``, ``stats-00003.json``, ``part-00003.done.json``."""
    return {"part": f"part-{replica:05d}.npz", "stats": f"stats-{replica:05d}.json",
            "done": f"part-{replica:05d}.done.json"}[kind]


@dataclass
class Predictions:
    """Predictions accumulated batch by batch in compact arrays (the part's columns)."""

    topk: int
    columns: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, samples: Sequence[dict[str, Any]], probs: torch.Tensor, shard_index: dict[str, int]) -> None:
        confidences, classes = probs.max(dim=1)
        cols = {
            "keys": np.asarray([s["__key__"].encode() for s in samples], dtype=np.bytes_),
            "shard": np.asarray([shard_index[s["__url__"]] for s in samples], dtype=np.int32),
            "classes": classes.numpy().astype(np.int32),
            "confidences": confidences.numpy().astype(np.float32),
        }
        if probs.shape[1] <= FULL_DISTRIBUTION_MAX_CLASSES:
            cols["probs"] = probs.numpy().astype(np.float16)
        else:
            values, indices = probs.topk(min(self.topk, probs.shape[1]), dim=1)
            cols["topk_indices"] = indices.numpy().astype(np.int32)
            cols["topk_values"] = values.numpy().astype(np.float16)
        for k, v in cols.items():
            self.columns.setdefault(k, []).append(v)

    def arrays(self, num_classes: int) -> dict[str, np.ndarray]:
        if not self.columns:  # no image: empty columns of the right kinds
            wide = num_classes <= FULL_DISTRIBUTION_MAX_CLASSES
            empty = {"keys": np.zeros(0, np.bytes_), "shard": np.zeros(0, np.int32), "classes": np.zeros(0, np.int32),
                     "confidences": np.zeros(0, np.float32)}
            if wide:
                empty["probs"] = np.zeros((0, num_classes), np.float16)
            else:
                empty["topk_indices"] = np.zeros((0, self.topk), np.int32)
                empty["topk_values"] = np.zeros((0, self.topk), np.float16)
            return empty
        return {k: np.concatenate(v) for k, v in self.columns.items()}


def encode_part(arrays: dict[str, np.ndarray], shard_names: Sequence[str]) -> bytes:
    """The ``part-NNNNN.npz`` bytes for these predictions."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays, shard_names=np.asarray(list(shard_names), dtype=np.str_))
    return buf.getvalue()


@torch.inference_mode()
def predict(model: torch.nn.Module, batches: Iterable[tuple[list[dict[str, Any]], torch.Tensor]],
            meta: dict[str, Any], device: torch.device, shard_index: dict[str, int], topk: int,
            cores: CoreShare | None = None, workers: int = 0) -> Predictions:
    """Softmax predictions of the model (eval mode, eval transform only) for every streamed batch."""
    model.eval().to(device, memory_format=torch.channels_last)
    out = Predictions(topk)
    for i, (samples, x) in enumerate(batches):
        if cores is not None and device.type == "cpu" and i % RETHREAD_EVERY == 0:
            torch.set_num_threads(cores.plan(workers)[0])  # replicas on this host start and finish at different times
        x = imgs.normalize(x.to(device, non_blocking=True), meta["mean"], meta["std"])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x.contiguous(memory_format=torch.channels_last))
        out.add(samples, torch.softmax(logits.float(), dim=1).cpu(), shard_index)
    return out


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
    cores = CoreShare()
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
    stream = Stream(mine, [], Copies(), ShardCatalog.of(mine))
    batches = ImageBatches(stream, cfg.batch_size, int(meta["image_size"]))
    _, workers = cores.plan(1) if device.type == "cpu" else (0, 1)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers if len(mine) > 1 else 0,
                                         pin_memory=device.type == "cuda")
    event("data", replica=replica_id, shards=len(mine), workers=loader.num_workers)

    # predict
    shard_index = {u: i for i, u in enumerate(shards)}
    tic = time.perf_counter()
    try:
        arrays = predict(model, loader, meta, device, shard_index, cfg.topk, cores,
                         loader.num_workers).arrays(int(meta["num_classes"]))
    except DataError as exc:
        raise DataError(f"unlabeled: {unwrap(exc)}") from None
    seconds = time.perf_counter() - tic
    keys, classes, confidences = arrays["keys"], arrays["classes"], arrays["confidences"]
    part = encode_part(arrays, [u.rsplit("/", 1)[-1] for u in shards])
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
        "images_per_second": len(keys) / seconds if seconds > 0 else 0.0,
    })
    event("labeled", replica=replica_id, images=len(keys), images_per_second=round(len(keys) / max(seconds, 1e-9), 1),
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
