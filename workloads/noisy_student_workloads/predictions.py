"""The label stage's output format: written part by part, read part by part.

A label replica ``r`` writes its predictions in parts of at most
:data:`PART_ROWS` images, so that neither the label stage nor a reader ever
holds more than one part:

* ``part-RRRRR-PPPPP.npz`` (part ``P`` of replica ``R``): ``keys`` (bytes),
  ``classes`` (int32), ``confidences`` (float32), ``shard`` (index into
  ``shard_names``, the file names of all unlabeled shards), and the soft
  distribution — ``probs`` (float16 N×K) when there are at most
  :data:`FULL_DISTRIBUTION_MAX_CLASSES` classes, else ``topk_indices`` /
  ``topk_values`` (float16, ``topk`` each). Rows are in the order the
  replica streamed its shards (tar order per shard);
* ``stats-RRRRR.json``: per-class confidence histograms (100 bins over
  [0, 1]) and counts of the images predicted as each class;
* ``progress-RRRRR.json``: while the replica labels, images done of its
  total, images/s and ETA (:class:`.stage.ImageProgress`; not an output);
* ``part-RRRRR.done.json``: the replica's marker, written last; it lists the
  replica's parts (``parts``) and their sha256 digests. A part that no
  marker lists is not part of the output (a replica that died mid-way).

Readers go through :func:`read_parts` and :func:`read_histograms` (the only
code that knows the layout); :func:`read_parts` checks each part's digest.
Label outputs of format 1 (one ``part-RRRRR.npz`` per replica, no ``parts``
in the marker) are read too.

Example::

    python -c "from noisy_student_workloads.predictions import read_histograms; \\
        print(read_histograms('file:///tmp/run/gen-1/labels/').sum(axis=1))"
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .config import ConfigError
from .stage import DONE, put, put_json, sha256
from .store import join_uri, open_store

FORMAT = 2
BINS = 100
FULL_DISTRIBUTION_MAX_CLASSES = 100
# Images per part: about 2.4 MB of predictions at 100 classes, whatever the unlabeled set's size.
PART_ROWS = 16384


def marker_name(replica: int) -> str:
    """``part-00003.done.json``: replica 3's marker."""
    return f"part-{replica:05d}.done.json"


def progress_name(replica: int) -> str:
    """``progress-00003.json``: replica 3's progress while it labels (not an output; see :class:`.stage.ImageProgress`)."""
    return f"progress-{replica:05d}.json"


def stats_name(replica: int) -> str:
    """``stats-00003.json``: replica 3's histograms."""
    return f"stats-{replica:05d}.json"


def part_name(replica: int, part: int) -> str:
    """``part-00003-00012.npz``: part 12 of replica 3."""
    return f"part-{replica:05d}-{part:05d}.npz"


def histogram(classes: np.ndarray, confidences: np.ndarray, num_classes: int) -> np.ndarray:
    """num_classes × 100 counts of confidences per predicted class (bins of 0.01)."""
    bins = np.clip((np.asarray(confidences) * BINS).astype(np.int64), 0, BINS - 1)
    hist = np.zeros((num_classes, BINS), dtype=np.int64)
    np.add.at(hist, (np.asarray(classes, dtype=np.int64), bins), 1)
    return hist


def columns(samples: Sequence[dict[str, Any]], probs: torch.Tensor, shard_index: dict[str, int],
            topk: int) -> dict[str, np.ndarray]:
    """One batch's rows of a part: its keys, shards, argmax, confidence and soft distribution."""
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
        values, indices = probs.topk(min(topk, probs.shape[1]), dim=1)
        cols["topk_indices"] = indices.numpy().astype(np.int32)
        cols["topk_values"] = values.numpy().astype(np.float16)
    return cols


def empty_columns(num_classes: int, topk: int) -> dict[str, np.ndarray]:
    """A part with no rows, its columns of the right kinds."""
    cols = {"keys": np.zeros(0, np.bytes_), "shard": np.zeros(0, np.int32), "classes": np.zeros(0, np.int32),
            "confidences": np.zeros(0, np.float32)}
    if num_classes <= FULL_DISTRIBUTION_MAX_CLASSES:
        cols["probs"] = np.zeros((0, num_classes), np.float16)
    else:
        cols["topk_indices"] = np.zeros((0, topk), np.int32)
        cols["topk_values"] = np.zeros((0, topk), np.float16)
    return cols


class PartWriter:
    """A replica's predictions, written as whole part objects of at most ``rows`` images each.

    ``add`` takes a batch; a part is written as soon as it is full, so memory
    holds at most one part. ``close`` writes the last part (one empty part
    for a replica with no image), the histograms, and then the replica's
    marker — always the last write.
    """

    def __init__(self, output: str, replica: int, num_classes: int, topk: int, shard_names: Sequence[str],
                 rows: int | None = None) -> None:
        self.output, self.replica, self.num_classes, self.topk = output, replica, num_classes, topk
        self.rows = rows or PART_ROWS
        self.shard_names = np.asarray(list(shard_names), dtype=np.str_)
        self.pending: list[dict[str, np.ndarray]] = []
        self.pending_rows = 0
        self.parts: list[str] = []
        self.digests: dict[str, str] = {}
        self.hist = np.zeros((num_classes, BINS), dtype=np.int64)
        self.images = 0
        self.confidence_sum = 0.0

    def add(self, cols: dict[str, np.ndarray]) -> None:
        self.pending.append(cols)
        self.pending_rows += len(cols["keys"])
        self.images += len(cols["keys"])
        self.confidence_sum += float(cols["confidences"].sum(dtype=np.float64))
        self.hist += histogram(cols["classes"], cols["confidences"], self.num_classes)
        if self.pending_rows >= self.rows:
            self.flush()

    def flush(self) -> None:
        """Write the pending rows as the next part."""
        arrays = ({k: np.concatenate([c[k] for c in self.pending]) for k in self.pending[0]} if self.pending
                  else empty_columns(self.num_classes, self.topk))
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays, shard_names=self.shard_names)
        name = part_name(self.replica, len(self.parts))
        put(join_uri(self.output, name), buf.getvalue(), self.digests)
        self.parts.append(name)
        self.pending, self.pending_rows = [], 0

    def close(self, marker: dict[str, Any]) -> dict[str, Any]:
        """Write the last part, the histograms and the replica's marker (``marker`` plus the parts); returns it."""
        if self.pending or not self.parts:
            self.flush()
        counts = self.hist.sum(axis=1).tolist()
        put_json(join_uri(self.output, stats_name(self.replica)), {
            "replica": self.replica, "num_classes": self.num_classes, "bins": BINS, "counts": counts,
            "histograms": self.hist.tolist()}, self.digests)
        full = {**marker, "format": FORMAT, "replica": self.replica, "images": self.images, "per_class": counts,
                "parts": self.parts, "sha256": self.digests}
        put_json(join_uri(self.output, marker_name(self.replica)), full)
        return full


def _replicas(labels: str) -> int:
    store = open_store(labels)
    done_uri = join_uri(labels, DONE)
    if not store.exists(done_uri):
        raise ConfigError(f"labels: {done_uri} does not exist (the label stage has not completed)")
    return int(store.get_json(done_uri)["metrics"]["replicas"])


def part_uris(labels: str) -> list[tuple[str, str | None]]:
    """(URI, sha256 or None) of every part of a completed label stage, in replica and part order."""
    store = open_store(labels)
    out: list[tuple[str, str | None]] = []
    for r in range(_replicas(labels)):
        marker = store.get_json(join_uri(labels, marker_name(r)))
        names = marker.get("parts", [f"part-{r:05d}.npz"])  # format 1: one part per replica
        digests = marker.get("sha256", {})
        out += [(u, digests.get(u)) for u in (join_uri(labels, n) for n in names)]
    return out


def read_parts(labels: str, fields: Sequence[str] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """The predictions of a completed label stage, one part at a time (``fields`` only, if given).

    Every part also carries ``shard_names``, the same in all parts. A part
    whose bytes do not match its digest is refused, naming it.
    """
    store = open_store(labels)
    names: np.ndarray | None = None
    for uri, digest in part_uris(labels):
        raw = store.get_bytes(uri)
        if digest is not None and sha256(raw) != digest:
            raise ConfigError(f"labels: {uri} does not match the sha256 its replica's marker recorded")
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            part = {k: z[k] for k in z.files if fields is None or k in fields or k == "shard_names"}
        if "shard_names" in part:
            if names is None:
                names = part["shard_names"]
            elif not np.array_equal(part["shard_names"], names):
                raise ConfigError(f"labels: the parts under {labels} label different unlabeled sets ({uri})")
        yield part


def read_histograms(labels: str) -> np.ndarray:
    """num_classes × 100 confidence histograms of a completed label stage, summed over replicas."""
    store = open_store(labels)
    hist = None
    for r in range(_replicas(labels)):
        h = np.asarray(store.get_json(join_uri(labels, stats_name(r)))["histograms"], dtype=np.int64)
        hist = h if hist is None else hist + h
    return hist if hist is not None else np.zeros((0, BINS), dtype=np.int64)
