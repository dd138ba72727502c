"""Pseudo-label unlabeled shards with the teacher — replica i of N.

Replica i labels shards i, i+N, i+2N, ... of the (sorted, expanded)
unlabeled pattern with the teacher in eval mode and the eval transform (no
augmentation, no dropout, no stochastic depth). Shards are streamed with
read-ahead (:mod:`.pipeline`), and the predictions are written as they
come, in parts of bounded size (:mod:`.predictions` has the format and its
readers), so memory does not grow with the number of unlabeled images. It
writes under ``output`` the replica's parts ``part-NNNNN-PPPPP.npz``, its
histograms ``stats-NNNNN.json`` and, last, its marker ``part-NNNNN.done.json``;
while it runs, ``progress-NNNNN.json`` (at most every 5 s: images done of
the replica's total, images/s, ETA), which drivers put in the run's status.

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
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from . import images as imgs
from .config import ConfigError, LabelConfig
from .models import load_final
from .pipeline import Copies, DataError, ImageBatches, ShardCatalog, Stream, unwrap
from .predictions import PartWriter, columns, marker_name, progress_name
from .runtime import CoreShare
from .stage import ImageProgress, event, now, put_json, run_entry_point, write_done
from .store import expand_shards, join_uri, open_store

# Batches between re-reading how many label replicas share this host's cores.
RETHREAD_EVERY = 20


@torch.inference_mode()
def predict(model: torch.nn.Module, batches: Iterable[tuple[list[dict[str, Any]], torch.Tensor]],
            meta: dict[str, Any], device: torch.device, shard_index: dict[str, int], writer: PartWriter,
            cores: CoreShare | None = None, workers: int = 0, progress: ImageProgress | None = None) -> None:
    """Softmax predictions of the model (eval mode, eval transform only) for every streamed batch, into ``writer``;
    ``progress`` counts the images done."""
    model.eval().to(device, memory_format=torch.channels_last)
    for i, (samples, x) in enumerate(batches):
        if cores is not None and device.type == "cpu" and i % RETHREAD_EVERY == 0:
            torch.set_num_threads(cores.plan(workers)[0])  # replicas on this host start and finish at different times
        x = imgs.normalize(x.to(device, non_blocking=True), meta["mean"], meta["std"])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x.contiguous(memory_format=torch.channels_last))
        writer.add(columns(samples, torch.softmax(logits.float(), dim=1).cpu(), shard_index, writer.topk))
        if progress is not None:
            progress.update_images(writer.images)


def finish_stage(output: str, num_replicas: int) -> dict[str, Any] | None:
    """Write ``_DONE.json`` when all part markers exist; deterministic content, from part markers only."""
    store = open_store(output)
    markers = [join_uri(output, marker_name(i)) for i in range(num_replicas)]
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
    done_uri = join_uri(out, marker_name(replica_id))
    if store.exists(done_uri):
        previous = store.get_json(done_uri)
        if previous.get("shards") == mine and previous.get("num_replicas") == num_replicas:
            event("skip", replica=replica_id, reason="part already labeled")  # a retried replica
            return finish_stage(out, num_replicas)
    catalog = ShardCatalog.of(shards)
    stream = Stream(mine, [], Copies(), catalog)
    batches = ImageBatches(stream, cfg.batch_size, int(meta["image_size"]))
    _, workers = cores.plan(1) if device.type == "cpu" else (0, 1)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=workers if len(mine) > 1 else 0,
                                         pin_memory=device.type == "cuda")
    event("data", replica=replica_id, shards=len(mine), workers=loader.num_workers, weights=meta["weights"])

    # predict, writing parts as they fill, then this replica's marker, then (maybe) the stage marker
    num_classes = int(meta["num_classes"])
    writer = PartWriter(out, replica_id, num_classes, cfg.topk, [u.rsplit("/", 1)[-1] for u in shards])
    progress = ImageProgress(join_uri(out, progress_name(replica_id)), catalog.count(mine), catalog.count(shards))
    progress.update_images(0)
    tic = time.perf_counter()
    try:
        predict(model, loader, meta, device, {u: i for i, u in enumerate(shards)}, writer, cores, loader.num_workers,
                progress)
    except DataError as exc:
        raise DataError(f"unlabeled: {unwrap(exc)}") from None
    seconds = time.perf_counter() - tic
    images = writer.images
    progress.update_images(images, done=True)
    writer.close({"num_replicas": num_replicas, "shards": mine, "finished": now(),
                  "images_per_second": images / seconds if seconds > 0 else 0.0})
    event("labeled", replica=replica_id, images=images, parts=len(writer.parts),
          images_per_second=round(images / max(seconds, 1e-9), 1),
          mean_confidence=round(writer.confidence_sum / images, 4) if images else None)
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
