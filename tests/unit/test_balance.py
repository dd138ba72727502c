"""Confidence filtering and class balancing on constructed predictions and histograms."""

import numpy as np
import pytest

from noisy_student_workloads.balance import (Picker, auto_target, class_thresholds, histogram, plan_selection, select,
                                             shard_rows, write_manifest)
from noisy_student_workloads.manifest import Manifest
from noisy_student_workloads.config import BalanceConfig, ConfigError, parse_config


def predictions(per_class: dict[int, list[float]]) -> tuple[np.ndarray, np.ndarray]:
    classes = np.concatenate([np.full(len(v), c) for c, v in per_class.items()])
    confidences = np.concatenate([np.asarray(v, dtype=float) for v in per_class.values()])
    return classes, confidences


def totals(sel, classes: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(classes[sel.indices], weights=sel.copies, minlength=num_classes).astype(int).tolist()


def test_threshold_filters_low_confidence_without_balancing():
    classes, conf = predictions({0: [0.9, 0.2, 0.31], 1: [0.29, 0.5]})
    sel = select(classes, conf, 2, threshold=0.3, balance=False)
    assert conf[sel.indices].tolist() == [0.9, 0.31, 0.5]
    assert sel.copies.tolist() == [1, 1, 1]
    assert sel.target is None
    assert [c["above_threshold"] for c in sel.classes] == [2, 1]


def test_short_class_is_duplicated_to_exact_target():
    classes, conf = predictions({0: [0.9] * 3, 1: [0.8] * 10})
    sel = select(classes, conf, 2, threshold=0.3, images_per_class=10, seed=1)
    assert totals(sel, classes, 2) == [10, 10]
    short = sel.copies[classes[sel.indices] == 0]
    assert sorted(short.tolist()) == [3, 3, 4]  # 10 / 3 with the remainder spread at random


def test_duplication_is_deterministic_for_a_seed():
    classes, conf = predictions({0: list(np.linspace(0.4, 0.9, 7)), 1: [0.9] * 20})
    a = select(classes, conf, 2, 0.3, 20, seed=5)
    b = select(classes, conf, 2, 0.3, 20, seed=5)
    assert a.copies.tolist() == b.copies.tolist()


def test_crowded_class_keeps_its_most_confident_images():
    conf0 = [0.35, 0.99, 0.5, 0.95, 0.97, 0.6]
    classes, conf = predictions({0: conf0, 1: [0.9, 0.8, 0.7]})
    sel = select(classes, conf, 2, threshold=0.3, images_per_class=3)
    kept0 = sorted(conf[sel.indices][classes[sel.indices] == 0].tolist())
    assert kept0 == [0.95, 0.97, 0.99]
    assert totals(sel, classes, 2) == [3, 3]
    assert sel.classes[0]["threshold"] == pytest.approx(0.95)  # raised from the histogram
    assert sel.classes[1]["threshold"] == pytest.approx(0.3)


def test_auto_target_is_median_of_nonempty_filtered_classes():
    assert auto_target(np.array([0, 10, 20, 100])) == 20
    assert auto_target(np.array([0, 0])) == 0
    classes, conf = predictions({0: [0.9] * 2, 1: [0.9] * 4, 2: [0.9] * 9 + [0.1] * 50})
    sel = select(classes, conf, 3, threshold=0.3, images_per_class="auto")
    assert sel.target == 4
    assert totals(sel, classes, 3) == [4, 4, 4]


def test_class_thresholds_from_constructed_histograms():
    hist = np.zeros((3, 100), dtype=int)
    hist[0, 90] = 5  # 5 images at 0.90-0.91
    hist[0, 50] = 5
    hist[1, 40] = 2  # fewer than the target: stays at the global threshold
    hist[2, 10] = 100  # below the global threshold only
    t = class_thresholds(hist, threshold=0.3, target=5)
    assert t.tolist() == pytest.approx([0.90, 0.3, 0.3])
    assert class_thresholds(hist, 0.3, None).tolist() == [0.3, 0.3, 0.3]


def test_histogram_bins_include_one():
    h = histogram(np.array([0, 0, 1]), np.array([0.0, 1.0, 0.555]), 2)
    assert h[0, 0] == 1 and h[0, 99] == 1 and h[1, 55] == 1 and h.sum() == 3


def test_empty_class_stays_empty():
    classes, conf = predictions({0: [0.9] * 4})
    sel = select(classes, conf, 3, 0.3, images_per_class=4)
    assert totals(sel, classes, 3) == [4, 0, 0]


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_threshold_outside_unit_interval_is_refused(threshold):
    classes, conf = predictions({0: [0.9]})
    with pytest.raises(ConfigError, match="confidence_threshold"):
        select(classes, conf, 1, threshold)
    with pytest.raises(ConfigError, match="confidence_threshold"):
        parse_config({"labels": "file:///l/", "num_classes": 10, "confidence_threshold": threshold,
                      "output": "file:///b/"}, BalanceConfig)


def test_balance_config_rejects_bad_fields():
    base = {"labels": "file:///l/", "num_classes": 10, "output": "file:///b/"}
    assert parse_config(base, BalanceConfig).images_per_class == "auto"
    with pytest.raises(ConfigError, match="images_per_class"):
        parse_config({**base, "images_per_class": 0}, BalanceConfig)
    with pytest.raises(ConfigError, match="images_per_class"):
        parse_config({**base, "images_per_class": "many"}, BalanceConfig)
    with pytest.raises(ConfigError, match="extra: unknown key"):
        parse_config({**base, "extra": 1}, BalanceConfig)


def test_class_out_of_range_names_num_classes():
    with pytest.raises(ConfigError, match="num_classes"):
        select(np.array([0, 5]), np.array([0.9, 0.9]), 3, 0.3)


def reference_select(classes, confidences, num_classes, threshold, target, seed):
    """Balancing as it was done with every prediction in memory: sort each class, keep its top ``target``."""
    hist = histogram(classes, confidences, num_classes)
    thresholds = class_thresholds(hist, threshold, target)
    rng = np.random.default_rng(seed)
    rows_out, copies_out = [], []
    for c in range(num_classes):
        rows = np.flatnonzero((classes == c) & (confidences >= thresholds[c]))
        copies = np.ones(len(rows), dtype=np.int64)
        if len(rows) > target:
            rows = rows[np.argsort(-confidences[rows], kind="stable")[:target]]
            copies = np.ones(len(rows), dtype=np.int64)
        elif 0 < len(rows) < target:
            copies = np.full(len(rows), target // len(rows), dtype=np.int64)
            copies[rng.choice(len(rows), size=target % len(rows), replace=False)] += 1
        rows_out.append(rows)
        copies_out.append(copies)
    rows, copies = np.concatenate(rows_out), np.concatenate(copies_out)
    order = np.argsort(rows, kind="stable")
    return rows[order], copies[order]


@pytest.mark.parametrize("seed", range(6))
def test_streamed_selection_equals_sorting_everything(seed):
    """Part by part, with memory independent of the number of predictions, the same rows and copies as a full sort.

    Confidences are float32 softmax outputs with many ties (a confident
    teacher puts thousands of images at the same value), so the radix passes
    and the ties in row order across parts are both exercised."""
    rng = np.random.default_rng(seed)
    n, num_classes = 5000, 7
    classes = rng.choice(num_classes, size=n, p=[0.4, 0.25, 0.15, 0.1, 0.05, 0.04, 0.01])
    confidences = rng.choice([1.0, 0.99951171875, 0.9990234375, 0.875], size=n).astype(np.float32)
    spread = rng.random(n) < 0.5
    confidences[spread] = rng.random(int(spread.sum())).astype(np.float32)
    confidences = confidences.astype(np.float64)
    target = int(rng.integers(50, 900))
    expected_rows, expected_copies = reference_select(classes, confidences, num_classes, 0.2, target, seed)

    cuts = np.sort(rng.choice(np.arange(1, n), size=9, replace=False))
    parts = list(zip(np.split(classes, cuts), np.split(confidences, cuts), strict=True))
    plan = plan_selection(lambda: iter(parts), num_classes, 0.2, target, seed=seed)
    picker = Picker(plan)
    picked = [picker.pick(c, x) for c, x in parts]
    rows = np.concatenate([r + start for (r, _), start in zip(picked, np.concatenate([[0], cuts]), strict=True)])
    copies = np.concatenate([c for _, c in picked])
    assert rows.tolist() == expected_rows.tolist()
    assert copies.tolist() == expected_copies.tolist()
    assert plan.kept == len(rows) and [c["after"] for c in plan.classes] == totals_of(classes, rows, copies, 7)
    assert set(totals_of(classes, rows, copies, 7)) <= {0, target}


def totals_of(classes, rows, copies, num_classes):
    return np.bincount(classes[rows], weights=copies, minlength=num_classes).astype(int).tolist()


def test_manifest_written_part_by_part_equals_the_selection(tmp_path):
    """Shards interleaved across parts (as a label replica's data workers write them), keys of different widths:
    each shard's block holds the selection's rows of that shard in label (tar) order, and the writer holds only
    the kept rows of the shards still open."""
    rng = np.random.default_rng(3)
    n, per_shard = 50007, 1000
    # two workers each reading every other shard, batches of 250 taken from them in turn
    order = np.concatenate([np.arange(s * per_shard, min(n, (s + 1) * per_shard)) for s in range(51)])
    shard_of = order // per_shard
    worker_rows = [order[shard_of % 2 == w] for w in (0, 1)]
    batches = [b for pair in zip(*[np.array_split(r, -(-len(r) // 250)) for r in worker_rows]) for b in pair]
    label_order = np.concatenate(batches + [r[sum(len(b) for b in batches[w::2]):] for w, r in enumerate(worker_rows)])
    assert sorted(label_order.tolist()) == list(range(n))
    every = {"keys": np.asarray([f"k{i}".encode() for i in label_order]),
             "classes": rng.integers(0, 4, n).astype(np.int32), "confidences": rng.random(n).astype(np.float32),
             "shard": (label_order // per_shard).astype(np.int32), "probs": rng.random((n, 4)).astype(np.float16)}
    names = np.asarray([f"u-{i:06d}.tar" for i in range(51)])
    cuts = [0, 20000, 50000, n]
    parts = [{**{k: v[a:b] for k, v in every.items()}, "shard_names": names} for a, b in zip(cuts, cuts[1:])]
    plan = plan_selection(lambda: ((p["classes"], p["confidences"]) for p in parts), 4, 0.1, 9000, seed=2)
    digests = {}
    out = f"file://{tmp_path}/"
    names_read, rows = shard_rows(iter(parts))
    writer = write_manifest(out, iter(parts), plan, names_read, rows, 4, digests)

    sel = select(every["classes"], every["confidences"], 4, 0.1, 9000, seed=2)
    manifest = Manifest.open(out + "manifest.json")
    assert manifest.rows == len(sel.indices) and manifest.images == int(sel.copies.sum())
    for s, name in enumerate(names):
        in_shard = every["shard"][sel.indices] == s
        block = manifest.block(name)
        if not in_shard.any():
            assert block is None
            continue
        assert block["keys"].tolist() == every["keys"][sel.indices][in_shard].tolist()
        assert block["copies"].tolist() == sel.copies[in_shard].tolist()
        np.testing.assert_array_equal(block["probs"], every["probs"][sel.indices][in_shard])
        assert manifest.copies(name) == int(sel.copies[in_shard].sum())
        manifest.release(block)
    assert manifest.peak_rows_held <= per_shard and manifest.rows_held == 0
    # carried from part to part: at most the two shards the two workers have open
    assert writer.peak_held <= 2 * per_shard
    assert set(digests) == {out + "manifest.json"} | {out + f"manifest/{n}.npz" for n in manifest.shards}