"""Filter pseudo-labels by confidence and balance the classes into a training manifest.

Reads the label stage's parts (:func:`.predictions.read_parts`), then, per
class of the teacher's prediction:

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

Writes the manifest (:mod:`.manifest`): per unlabeled shard a block
``manifest/<shard>.npz`` of the images kept, in tar order, with their
``copies`` and soft targets, and the index ``manifest.json`` — so that
training streams the shards and reads each shard's entries with it;
``thresholds.json`` (per class: threshold, counts before and after) and
``_DONE.json``.

Memory does not grow with the number of predictions: the selection is
decided in a few passes over the parts, one part in memory at a time
(:func:`plan_selection`: counts, then each crowded class's cut-off by radix
selection), and a shard's block is written as soon as its last prediction
has gone past (:func:`write_manifest`).

Command line::

    python -m noisy_student_workloads.balance --config '{"labels": "file:///tmp/run/gen-1/labels/",
        "num_classes": 10, "output": "file:///tmp/run/gen-1/balance/"}'
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .config import BalanceConfig, ConfigError
from .manifest import TARGET_COLUMNS, ManifestWriter
from .predictions import BINS, histogram, read_histograms, read_parts
from .stage import event, put_json, run_entry_point, write_done
from .store import join_uri

# Bits of a confidence resolved per pass when finding a crowded class's cut-off (4096 counters per class).
RADIX_BITS = 12


@dataclass
class Selection:
    """The outcome of balancing: rows of the input to keep, copies of each, and a per-class report."""

    indices: np.ndarray  # int64, sorted rows of the input predictions
    copies: np.ndarray  # int64, >= 1, same length as indices
    target: int | None  # images per class aimed at (None without balancing)
    classes: list[dict[str, Any]] = field(default_factory=list)


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


# (classes, confidences) of the predictions, part by part in row order; each call starts a new pass.
Passes = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


def _bits(confidences: np.ndarray) -> np.ndarray:
    """Non-negative confidences as uint64 in the same order (``-0.0`` becomes ``0.0``)."""
    return (np.asarray(confidences, dtype=np.float64) + 0.0).view(np.uint64)


def _ranks(groups: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Each element's index among the elements of its group before it, and the group sizes."""
    counts = np.bincount(groups, minlength=num_groups)
    order = np.argsort(groups, kind="stable")
    ranks = np.empty(len(groups), dtype=np.int64)
    ranks[order] = np.arange(len(groups)) - (np.cumsum(counts) - counts)[groups[order]]
    return ranks, counts


def _checked(classes: np.ndarray, confidences: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    classes = np.asarray(classes, dtype=np.int64)
    confidences = np.asarray(confidences, dtype=np.float64)
    if classes.shape != confidences.shape:
        raise ValueError("classes and confidences must have the same length")
    if len(classes) and (classes.min() < 0 or classes.max() >= num_classes):
        raise ConfigError(f"num_classes: {num_classes} but the pseudo-labels have class {int(classes.max())}")
    return classes, confidences


@dataclass
class Plan:
    """Per class, which candidates (confidence at or above the class threshold) to keep and how many copies.

    A crowded class (more candidates than the target) keeps its ``target``
    most confident candidates, ties in row order: those whose confidence
    bits shifted right by ``shift`` exceed ``prefix``, and the first
    ``ties`` of those equal to it. Other classes (``shift`` 64) keep every
    candidate, ``copies`` times, and one more for the candidates (by index
    in row order) in ``extra``.
    """

    thresholds: np.ndarray
    target: int | None
    prefix: np.ndarray
    shift: np.ndarray
    ties: np.ndarray
    copies: np.ndarray
    extra: dict[int, np.ndarray]
    classes: list[dict[str, Any]]
    rows: int

    @property
    def kept(self) -> int:
        return sum(c["kept"] for c in self.classes)


def _cutoffs(passes: Passes, thresholds: np.ndarray, crowded: np.ndarray,
             target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``target``-th highest confidence of each crowded class, by radix selection.

    Each pass over the predictions resolves :data:`RADIX_BITS` more bits of
    it, counting only the candidates still in the bucket that holds it, so
    memory is a few thousand counters per class, whatever the number of
    predictions. It stops for a class when the bucket holds exactly the
    images still to take (all of them are kept) or is a single value (the
    first ones in row order are kept).
    """
    num_classes = len(thresholds)
    prefix = np.zeros(num_classes, dtype=np.uint64)
    shift = np.full(num_classes, 64, dtype=np.uint64)
    need = np.where(crowded, target, 0).astype(np.int64)
    active = crowded.copy()
    width = 1 << RADIX_BITS
    while active.any():
        lower = np.where(active, np.maximum(shift.astype(np.int64) - RADIX_BITS, 0), shift).astype(np.uint64)
        counts = np.zeros((num_classes, width), dtype=np.int64)
        for classes, confidences in passes():
            classes, confidences = _checked(classes, confidences, num_classes)
            m = active[classes] & (confidences >= thresholds[classes])
            c, x = classes[m], _bits(confidences[m])
            # Bits above `shift` must equal the prefix; at 64 every non-negative float's top bit (0) matches prefix 0.
            inside = (x >> np.minimum(shift[c], np.uint64(63))) == prefix[c]
            mask = (np.uint64(1) << (shift[c] - lower[c])) - np.uint64(1)
            digits = ((x >> lower[c]) & mask).astype(np.int64)
            np.add.at(counts, (c[inside], digits[inside]), 1)
        for k in np.flatnonzero(active):
            from_top = np.cumsum(counts[k, ::-1])
            d = width - 1 - int(np.searchsorted(from_top, need[k]))  # the digit whose bucket holds the cut-off
            need[k] -= int(from_top[width - 1 - d] - counts[k, d])
            prefix[k] = (prefix[k] << (shift[k] - lower[k])) | np.uint64(d)
            shift[k] = lower[k]
            active[k] = not (counts[k, d] == need[k] or shift[k] == 0)
    return prefix, shift, need


def plan_selection(passes: Passes, num_classes: int, threshold: float, images_per_class: int | str = "auto",
                   balance: bool = True, seed: int = 0, histograms: np.ndarray | None = None) -> Plan:
    """Decide what to keep of each class in a few passes over the predictions, holding one part at a time.

    ``histograms`` (num_classes × 100) default to those of the predictions;
    the label stage computes them as it goes and they sum to the same.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"confidence_threshold: {threshold} is outside [0, 1]")
    before = np.zeros(num_classes, dtype=np.int64)
    filtered = np.zeros(num_classes, dtype=np.int64)
    hist = np.zeros((num_classes, BINS), dtype=np.int64)
    rows = 0
    for classes, confidences in passes():
        classes, confidences = _checked(classes, confidences, num_classes)
        rows += len(classes)
        before += np.bincount(classes, minlength=num_classes)
        filtered += np.bincount(classes[confidences >= threshold], minlength=num_classes)
        if histograms is None:
            hist += histogram(classes, confidences, num_classes)
    hist = hist if histograms is None else np.asarray(histograms)
    if hist.shape != (num_classes, BINS):
        raise ConfigError(f"num_classes: {num_classes} but the label histograms are {hist.shape[0]} × {hist.shape[1]}")
    if not balance:
        target = None
    elif images_per_class == "auto":
        target = auto_target(filtered)
    else:
        target = int(images_per_class)
    thresholds = class_thresholds(hist, threshold, target)

    candidates = np.zeros(num_classes, dtype=np.int64)
    for classes, confidences in passes():
        classes, confidences = _checked(classes, confidences, num_classes)
        candidates += np.bincount(classes[confidences >= thresholds[classes]], minlength=num_classes)
    crowded = candidates > target if target is not None else np.zeros(num_classes, dtype=bool)
    if crowded.any():
        prefix, shift, ties = _cutoffs(passes, thresholds, crowded, int(target or 0))
    else:
        prefix, shift, ties = (np.zeros(num_classes, np.uint64), np.full(num_classes, 64, np.uint64),
                               np.zeros(num_classes, np.int64))

    rng = np.random.default_rng(seed)
    copies = np.ones(num_classes, dtype=np.int64)
    extra: dict[int, np.ndarray] = {}
    report = []
    for c in range(num_classes):
        n = int(candidates[c])
        kept = min(n, target) if crowded[c] and target is not None else n
        if target is not None and 0 < n < target:  # the paper's stochastic rounding of target / n, exact total
            copies[c] = target // n
            extra[c] = np.sort(rng.choice(n, size=target % n, replace=False))
        report.append({
            "class": c,
            "threshold": float(thresholds[c]),
            "predicted": int(before[c]),
            "above_threshold": int(filtered[c]),
            "kept": kept,
            "after": kept * int(copies[c]) + len(extra.get(c, ())),
        })
    return Plan(thresholds, target, prefix, shift, ties, copies, extra, report, rows)


class Picker:
    """Applies a :class:`Plan` to the predictions part by part, in the row order the plan was made in."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.seen = np.zeros(len(plan.thresholds), dtype=np.int64)  # candidates so far, per class
        self.tied = np.zeros(len(plan.thresholds), dtype=np.int64)  # candidates at a crowded class's cut-off so far

    def pick(self, classes: np.ndarray, confidences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows of this part to keep (ascending) and the copies of each."""
        plan, num_classes = self.plan, len(self.plan.thresholds)
        classes, confidences = _checked(classes, confidences, num_classes)
        rows = np.flatnonzero(confidences >= plan.thresholds[classes])
        c = classes[rows]
        index, counts = _ranks(c, num_classes)
        index += self.seen[c]
        self.seen += counts

        keep = np.ones(len(rows), dtype=bool)
        crowded = plan.shift[c] < 64
        key = _bits(confidences[rows]) >> np.minimum(plan.shift[c], np.uint64(63))
        tie = crowded & (key == plan.prefix[c])
        keep[crowded & ~tie] = key[crowded & ~tie] > plan.prefix[c][crowded & ~tie]
        tie_rank, tie_counts = _ranks(c[tie], num_classes)
        keep[tie] = self.tied[c[tie]] + tie_rank < plan.ties[c[tie]]
        self.tied += tie_counts

        copies = plan.copies[c].copy()
        for k in set(np.unique(c).tolist()) & plan.extra.keys():
            m = c == k
            copies[m] += np.isin(index[m], plan.extra[k])
        return rows[keep], copies[keep]


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
    """Filter by confidence and balance classes — in memory, no I/O (:func:`plan_selection` on one part)."""
    classes, confidences = np.asarray(classes), np.asarray(confidences)
    if classes.shape != confidences.shape:
        raise ValueError("classes and confidences must have the same length")
    plan = plan_selection(lambda: [(classes, confidences)], num_classes, threshold, images_per_class, balance, seed,
                          histograms)
    rows, copies = Picker(plan).pick(classes, confidences)
    return Selection(rows, copies, plan.target, plan.classes)


def shard_rows(parts: Iterable[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """The unlabeled shards' file names and how many predictions each has (one pass over the ``shard`` column)."""
    names, rows = None, None
    for part in parts:
        if "shard" not in part:
            raise ConfigError("labels: predictions without a shard column (an older label stage): label again")
        names = part["shard_names"] if names is None else names
        counts = np.bincount(part["shard"], minlength=len(names))
        rows = counts if rows is None else rows + counts
    if names is None or rows is None:
        raise ConfigError("labels: the label stage wrote no parts")
    return names, rows


def write_manifest(output: str, parts: Iterable[dict[str, np.ndarray]], plan: Plan, shard_names: Sequence[str],
                   rows_per_shard: np.ndarray, num_classes: int, digests: dict[str, str]) -> ManifestWriter:
    """Stream the kept rows of ``parts`` (and their copies) into the per-shard manifest under ``output``
    (:mod:`.manifest`), one part and the open shards' kept rows in memory; returns the writer."""
    picker = Picker(plan)
    writer = ManifestWriter(output, shard_names, rows_per_shard, num_classes)
    for part in parts:
        rows, copies = picker.pick(part["classes"], part["confidences"])
        kept = {k: part[k][rows] for k in ("keys", *TARGET_COLUMNS) if k in part}
        kept["copies"] = copies.astype(np.int32)
        writer.add(part["shard"], rows, kept)
    writer.close()
    digests.update(writer.digests)
    return writer


def run(cfg: BalanceConfig) -> dict[str, Any]:
    """Balance as configured, streaming the label stage's parts; returns the stage marker."""
    out = cfg.output
    put_json(join_uri(out, "config.json"), cfg.model_dump(mode="json"))
    hist = read_histograms(cfg.labels)
    if hist.shape[0] != cfg.num_classes:
        raise ConfigError(f"num_classes: {cfg.num_classes} but the labels have {hist.shape[0]} classes")
    fields = ("classes", "confidences")
    plan = plan_selection(lambda: ((p["classes"], p["confidences"]) for p in read_parts(cfg.labels, fields)),
                          cfg.num_classes, cfg.confidence_threshold, cfg.images_per_class, cfg.balance, cfg.seed, hist)
    if plan.rows == 0:
        raise ConfigError(f"labels: {cfg.labels} holds no predictions (empty unlabeled set)")
    if plan.kept == 0:
        raise ConfigError(f"confidence_threshold: {cfg.confidence_threshold} keeps no image")

    digests: dict[str, str] = {}
    names, rows = shard_rows(read_parts(cfg.labels, ("shard",)))
    write_manifest(out, read_parts(cfg.labels), plan, names, rows, cfg.num_classes, digests)
    put_json(join_uri(out, "thresholds.json"), {
        "confidence_threshold": cfg.confidence_threshold, "target": plan.target, "classes": plan.classes}, digests)
    metrics = {
        "predicted": plan.rows,
        "kept": plan.kept,
        "images": sum(c["after"] for c in plan.classes),
        "target": plan.target,
        "per_class": [c["after"] for c in plan.classes],
    }
    event("balanced", **{k: v for k, v in metrics.items() if k != "per_class"})
    return write_done(out, "balance", metrics, digests)


def main(argv: Sequence[str] | None = None) -> int:
    return run_entry_point(
        "Filter pseudo-labels by confidence and balance the classes.", BalanceConfig, lambda cfg, _: run(cfg), argv
    )


if __name__ == "__main__":
    sys.exit(main())
