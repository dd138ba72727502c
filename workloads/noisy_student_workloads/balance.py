"""Filter pseudo-labels by confidence and balance the classes into a training manifest.

Reads the label stage's parts (``labels``/``part-*.npz``, ``stats-*.json``),
then, per class of the teacher's prediction:

1. drops images whose confidence is below ``confidence_threshold``;
2. with ``balance``, brings the class to the target count:

   * too many images: the class threshold is raised, from the confidence
     histograms (0.00..1.00 in steps of 0.01, like the paper's code), to the
     highest bin edge that still keeps at least the target, and of those the
     ``target`` most confident images are kept;
   * too few: every image is duplicated ``target // n`` times and
     ``target % n`` images, chosen at random with ``seed``, get one more copy
     (the paper's stochastic rounding of ``target / n``, with an exact total).

``images_per_class: auto`` means the median per-class count after the
confidence filter, over the classes that kept any image. The median is
robust to the class the teacher over-predicts (a sink for its confusions,
which a mean would follow) and to nearly empty classes; half of the classes
are trimmed to their most confident images and half duplicated, so the
student sees the balanced label distribution without throwing away most of
the data or repeating a rare class hundreds of times.

Writes ``manifest.npz`` (``keys``, ``classes``, ``copies``, the soft
targets ``probs`` or ``topk_indices``/``topk_values``, and ``shard`` with
``shard_names``: which unlabeled shard each key is in, in tar order per
shard, so that training streams the shards and applies the copies), ``thresholds.json``
(per class: threshold, counts before and after) and ``_DONE.json``.

Command line::

    python -m noisy_student_workloads.balance --config '{"labels": "file:///tmp/run/gen-1/labels/",
        "num_classes": 10, "output": "file:///tmp/run/gen-1/balance/"}'
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import BalanceConfig, ConfigError
from .stage import DONE, event, put, put_json, run_entry_point, write_done
from .store import join_uri, open_store

BINS = 100


@dataclass
class Selection:
    """The outcome of balancing: rows of the input to keep, copies of each, and a per-class report."""

    indices: np.ndarray  # int64, sorted rows of the input predictions
    copies: np.ndarray  # int64, >= 1, same length as indices
    target: int | None  # images per class aimed at (None without balancing)
    classes: list[dict[str, Any]] = field(default_factory=list)


def histogram(classes: np.ndarray, confidences: np.ndarray, num_classes: int) -> np.ndarray:
    """num_classes × 100 counts of confidences per predicted class (bins of 0.01)."""
    bins = np.clip((np.asarray(confidences) * BINS).astype(np.int64), 0, BINS - 1)
    hist = np.zeros((num_classes, BINS), dtype=np.int64)
    np.add.at(hist, (np.asarray(classes, dtype=np.int64), bins), 1)
    return hist


def class_thresholds(histograms: np.ndarray, threshold: float, target: int | None) -> np.ndarray:
    """Per-class confidence thresholds from histograms.

    Starts at ``threshold`` and, for a class with more than ``target`` images
    at or above it, raises the class threshold to the highest bin edge
    ``b / 100`` that still keeps at least ``target`` images.
    """
    hist = np.asarray(histograms, dtype=np.int64)
    at_or_above = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]  # [c, b] = images with confidence >= b/100
    thresholds = np.full(hist.shape[0], float(threshold))
    if target is None:
        return thresholds
    first = int(np.ceil(threshold * BINS - 1e-9))
    for c in range(hist.shape[0]):
        if first >= BINS or at_or_above[c, max(first, 0)] <= target:
            continue  # not more than the target: nothing to trim
        edges = [b for b in range(max(first, 0), BINS) if at_or_above[c, b] >= target]
        if edges and edges[-1] / BINS > threshold:
            thresholds[c] = edges[-1] / BINS
    return thresholds


def auto_target(counts: np.ndarray) -> int:
    """Median per-class count over the classes that have any image (see the module docstring)."""
    nonzero = np.asarray(counts)[np.asarray(counts) > 0]
    if len(nonzero) == 0:
        return 0
    return max(1, int(round(float(np.median(nonzero)))))


def select(
    classes: np.ndarray,
    confidences: np.ndarray,
    num_classes: int,
    threshold: float,
    images_per_class: int | str = "auto",
    balance: bool = True,
    seed: int = 0,
    histograms: np.ndarray | None = None,
) -> Selection:
    """Filter by confidence and balance classes — pure numpy, no I/O.

    ``histograms`` (num_classes × 100) default to those of the predictions;
    the label stage computes them per shard and they sum to the same.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"confidence_threshold: {threshold} is outside [0, 1]")
    classes = np.asarray(classes, dtype=np.int64)
    confidences = np.asarray(confidences, dtype=np.float64)
    if classes.shape != confidences.shape:
        raise ValueError("classes and confidences must have the same length")
    if len(classes) and (classes.min() < 0 or classes.max() >= num_classes):
        raise ConfigError(f"num_classes: {num_classes} but the pseudo-labels have class {int(classes.max())}")
    hist = histogram(classes, confidences, num_classes) if histograms is None else np.asarray(histograms)
    if hist.shape != (num_classes, BINS):
        raise ConfigError(f"num_classes: {num_classes} but the label histograms are {hist.shape[0]} × {hist.shape[1]}")

    passed = confidences >= threshold
    before = np.bincount(classes, minlength=num_classes)
    filtered = np.bincount(classes[passed], minlength=num_classes)
    if not balance:
        target = None
    elif images_per_class == "auto":
        target = auto_target(filtered)
    else:
        target = int(images_per_class)
    per_class_threshold = class_thresholds(hist, threshold, target)
    rng = np.random.default_rng(seed)

    keep_rows, keep_copies, report = [], [], []
    for c in range(num_classes):
        rows = np.flatnonzero((classes == c) & (confidences >= per_class_threshold[c]))
        copies = np.ones(len(rows), dtype=np.int64)
        if target is not None and len(rows) > target:
            # most confident first; stable, so ties keep input order
            rows = rows[np.argsort(-confidences[rows], kind="stable")[:target]]
            copies = np.ones(len(rows), dtype=np.int64)
        elif target is not None and 0 < len(rows) < target:
            copies = np.full(len(rows), target // len(rows), dtype=np.int64)
            copies[rng.choice(len(rows), size=target % len(rows), replace=False)] += 1
        keep_rows.append(rows)
        keep_copies.append(copies)
        report.append({
            "class": c,
            "threshold": float(per_class_threshold[c]),
            "predicted": int(before[c]),
            "above_threshold": int(filtered[c]),
            "kept": int(len(rows)),
            "after": int(copies.sum()),
        })
    rows = np.concatenate(keep_rows) if keep_rows else np.zeros(0, dtype=np.int64)
    copies = np.concatenate(keep_copies) if keep_copies else np.zeros(0, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    return Selection(rows[order].astype(np.int64), copies[order], target, report)


def load_parts(labels: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """All predictions of the label stage (concatenated parts) and their summed histograms."""
    store = open_store(labels)
    done_uri = join_uri(labels, DONE)
    if not store.exists(done_uri):
        raise ConfigError(f"labels: {done_uri} does not exist (the label stage has not completed)")
    replicas = int(store.get_json(done_uri)["metrics"]["replicas"])
    parts: list[dict[str, np.ndarray]] = []
    names: list[np.ndarray] = []
    hist = None
    for i in range(replicas):
        with np.load(io.BytesIO(store.get_bytes(join_uri(labels, f"part-{i:05d}.npz"))), allow_pickle=False) as z:
            parts.append({k: z[k] for k in z.files if k != "shard_names"})
            if "shard_names" in z.files:
                names.append(z["shard_names"])
        h = np.asarray(store.get_json(join_uri(labels, f"stats-{i:05d}.json"))["histograms"], dtype=np.int64)
        hist = h if hist is None else hist + h
    fields = [k for k in parts[0] if all(k in p for p in parts)]
    merged = {k: np.concatenate([p[k] for p in parts]) for k in fields}
    if len(names) == replicas and "shard" in merged:
        if any(not np.array_equal(n, names[0]) for n in names):
            raise ConfigError(f"labels: the parts under {labels} label different unlabeled sets")
        merged["shard_names"] = names[0]
    return merged, hist if hist is not None else np.zeros((0, BINS), dtype=np.int64)


def run(cfg: BalanceConfig) -> dict[str, Any]:
    """Balance as configured; returns the stage marker."""
    out = cfg.output
    put_json(join_uri(out, "config.json"), cfg.model_dump(mode="json"))
    predictions, hist = load_parts(cfg.labels)
    if len(predictions["keys"]) == 0:
        raise ConfigError(f"labels: {cfg.labels} holds no predictions (empty unlabeled set)")
    if hist.shape[0] != cfg.num_classes:
        raise ConfigError(f"num_classes: {cfg.num_classes} but the labels have {hist.shape[0]} classes")
    sel = select(predictions["classes"], predictions["confidences"], cfg.num_classes, cfg.confidence_threshold,
                 cfg.images_per_class, cfg.balance, cfg.seed, hist)
    if len(sel.indices) == 0:
        raise ConfigError(f"confidence_threshold: {cfg.confidence_threshold} keeps no image")

    manifest = {"keys": predictions["keys"][sel.indices], "classes": predictions["classes"][sel.indices],
                "copies": sel.copies}
    for name in ("probs", "topk_indices", "topk_values", "shard"):
        if name in predictions:
            manifest[name] = predictions[name][sel.indices]
    if "shard_names" in predictions:
        manifest["shard_names"] = predictions["shard_names"]
    buf = io.BytesIO()
    np.savez_compressed(buf, **manifest)
    digests: dict[str, str] = {}
    put(join_uri(out, "manifest.npz"), buf.getvalue(), digests)
    put_json(join_uri(out, "thresholds.json"), {
        "confidence_threshold": cfg.confidence_threshold, "target": sel.target, "classes": sel.classes}, digests)
    metrics = {
        "predicted": int(len(predictions["keys"])),
        "kept": int(len(sel.indices)),
        "images": int(sel.copies.sum()),
        "target": sel.target,
        "per_class": [c["after"] for c in sel.classes],
    }
    event("balanced", **{k: v for k, v in metrics.items() if k != "per_class"})
    return write_done(out, "balance", metrics, digests)


def main(argv: Sequence[str] | None = None) -> int:
    return run_entry_point(
        "Filter pseudo-labels by confidence and balance the classes.", BalanceConfig, lambda cfg, _: run(cfg), argv
    )


if __name__ == "__main__":
    sys.exit(main())
