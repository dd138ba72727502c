"""The label stage's part files: written a bounded part at a time, read back in order, digests checked."""

from pathlib import Path

import numpy as np
import pytest
import torch

from noisy_student_workloads.config import ConfigError
from noisy_student_workloads.label import finish_stage
from noisy_student_workloads.predictions import (PartWriter, columns, marker_name, part_name, read_histograms,
                                                 read_parts)
from noisy_student_workloads.stage import now


def write_replica(out: str, replica: int, num_replicas: int, probs: torch.Tensor, rows: int) -> PartWriter:
    writer = PartWriter(out, replica, probs.shape[1], 3, ["a.tar", "b.tar"], rows=rows)
    for start in range(0, len(probs), 4):  # batches of 4
        batch = probs[start:start + 4]
        samples = [{"__key__": f"r{replica}-{start + i:04d}", "__url__": "s3://d/b.tar"} for i in range(len(batch))]
        writer.add(columns(samples, batch, {"s3://d/a.tar": 0, "s3://d/b.tar": 1}, 3))
        assert writer.pending_rows < rows  # never more than a part in memory
    writer.close({"num_replicas": num_replicas, "shards": [f"s{replica}"], "finished": now()})
    return writer


def test_parts_round_trip_in_order_with_histograms(tmp_path: Path) -> None:
    out = f"file://{tmp_path}/labels/"
    probs = [torch.softmax(torch.randn(n, 5, generator=torch.Generator().manual_seed(n)), dim=1) for n in (23, 9)]
    writers = [write_replica(out, r, 2, p, rows=8) for r, p in enumerate(probs)]
    assert [len(w.parts) for w in writers] == [3, 2]  # 23 rows in parts of 8 (written once a batch fills one)
    assert finish_stage(out, 2)["metrics"]["images"] == 32

    parts = list(read_parts(out))
    keys = np.concatenate([p["keys"] for p in parts])
    assert keys.tolist() == [f"r0-{i:04d}".encode() for i in range(23)] + [f"r1-{i:04d}".encode() for i in range(9)]
    conf = np.concatenate([p["confidences"] for p in parts])
    np.testing.assert_allclose(conf, torch.cat(probs).max(dim=1).values.numpy(), rtol=1e-6)
    assert all(p["shard_names"].tolist() == ["a.tar", "b.tar"] for p in parts)
    assert set(next(read_parts(out, ("classes",)))) == {"classes", "shard_names"}
    hist = read_histograms(out)
    assert hist.shape == (5, 100) and hist.sum() == 32
    assert hist.sum(axis=1).tolist() == np.bincount(np.concatenate([p["classes"] for p in parts]), minlength=5).tolist()


def test_unlisted_part_is_ignored_and_a_changed_part_is_refused(tmp_path: Path) -> None:
    out = f"file://{tmp_path}/labels/"
    write_replica(out, 0, 1, torch.softmax(torch.randn(10, 4), dim=1), rows=4)
    finish_stage(out, 1)
    (tmp_path / "labels" / part_name(0, 7)).write_bytes(b"left by a replica that died")
    assert sum(len(p["keys"]) for p in read_parts(out)) == 10
    assert (tmp_path / "labels" / marker_name(0)).exists()
    target = tmp_path / "labels" / part_name(0, 1)
    target.write_bytes(target.read_bytes() + b"\0")
    with pytest.raises(ConfigError, match=part_name(0, 1)):
        list(read_parts(out))


def test_reading_before_the_stage_completed_names_the_marker(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="_DONE.json"):
        list(read_parts(f"file://{tmp_path}/labels/"))
