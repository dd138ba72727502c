"""The streaming data path on real shards: coverage across ranks and workers, copies, checks that name shard and key."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from noisy_student_workloads.pipeline import (
    Copies,
    DataError,
    ImageBatches,
    ShardCatalog,
    Stream,
    TrainBatches,
    even_counts,
    segments_of,
    split_range,
    stream_samples,
)
from noisy_student_workloads.manifest import Manifest, ManifestWriter
from noisy_student_workloads.shards import ShardWriter, encode_png
from noisy_student_workloads.store import FileStore


def write_shards(tmp_path: Path, name: str, n: int, per_shard: int, labeled: bool = False,
                 image: np.ndarray | None = None) -> tuple[list[str], list[str]]:
    """``n`` real 8×8 PNG samples in shards of ``per_shard`` (sample i a flat grey i, or ``image``), with a
    packing marker (digests, counts)."""
    store = FileStore()
    keys = [f"{name}-{i:05d}" for i in range(n)]
    with ShardWriter(store, f"file://{tmp_path}/{name}-%06d.tar", per_shard) as w:
        for i, key in enumerate(keys):
            pixels = np.full((8, 8), i % 256, np.uint8) if image is None else image
            w.write(key, encode_png(pixels), i % 10 if labeled else None)
    store.put_json(f"file://{tmp_path}/_DONE.json", {
        "sha256": {**_existing(tmp_path, "sha256"), **dict(zip(w.uris, w.sha256))},
        "shard_samples": {**_existing(tmp_path, "shard_samples"), **dict(zip(w.uris, w.counts))},
    })
    return w.uris, keys


def _existing(tmp_path: Path, field: str) -> dict:
    marker = tmp_path / "_DONE.json"
    return json.loads(marker.read_text())[field] if marker.exists() else {}


def stream_of(uris: list[str], copies: Copies | None = None, shuffle: bool = True) -> Stream:
    catalog = ShardCatalog.of(uris)
    copies = copies or Copies()
    return Stream(uris, copies.sizes(uris, catalog), copies, catalog, shuffle, shuffle_buffer=50)


def manifest_copies(uris: list[str], keys: list[str], copies: list[int], per_shard: int) -> Copies:
    """A real balance manifest (per-shard blocks and index, written by the balance stage's writer) of ``copies``
    per key; every kept key's class is its index modulo 10."""
    out = uris[0].rsplit("/", 1)[0] + "/balance/"
    shard = np.arange(len(keys)) // per_shard
    writer = ManifestWriter(out, [u.rsplit("/", 1)[-1] for u in uris], np.bincount(shard, minlength=len(uris)), 10)
    kept = np.flatnonzero(np.asarray(copies) > 0)
    writer.add(shard, kept, {"keys": np.asarray([keys[i].encode() for i in kept]),
                             "copies": np.asarray(copies, np.int32)[kept], "classes": (kept % 10).astype(np.int32),
                             "probs": np.eye(10, dtype=np.float16)[kept % 10]})
    writer.close()
    return Copies(Manifest.open(out + "manifest.json"))


def epoch_keys(data: TrainBatches, epoch: int, world: int, workers: int, source: int) -> list[Counter]:
    """Per rank: how often each key of stream ``source`` is drawn in ``epoch`` (all workers of the rank)."""
    per_rank = []
    for rank in range(world):
        data.rank = rank
        seen: Counter = Counter()
        steps = 0
        for worker in range(workers):
            batches = list(data.epoch_items(epoch, worker, workers)[source])
            steps += len(batches)
            assert all(len(b) == even_counts(data.batches[source], world)[rank] for b in batches)
            seen.update(s["__key__"] for b in batches for s in b)
        assert steps == data.steps  # every rank takes the same number of steps (DDP)
        per_rank.append(seen)
    return per_rank


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 1), (2, 3), (3, 2)])
def test_every_key_is_seen_its_copies_per_epoch_across_ranks(tmp_path: Path, world: int, workers: int) -> None:
    uris, keys = write_shards(tmp_path, "u", 240, 50)
    rng = np.random.default_rng(0)
    copies = [int(c) for c in rng.choice([0, 1, 2, 3], size=len(keys))]
    total = sum(copies)
    global_batch = 12
    steps = -(-total // global_batch)
    pseudo = stream_of(uris, manifest_copies(uris, keys, copies, 50))
    assert pseudo.total == total
    data = TrainBatches([pseudo], [global_batch], steps, 0, world, seed=5, first_epoch=0, image_size=8,
                        targets=[None])
    per_rank = epoch_keys(data, 0, world, workers, 0)
    seen = sum(per_rank, Counter())
    assert sum(seen.values()) == steps * global_batch
    pad = steps * global_batch - total  # the last step's rounding is filled by drawing again
    extra = Counter({k: seen[k] - c for k, c in zip(keys, copies)})
    assert all(seen[k] >= c for k, c in zip(keys, copies)), "a key was drawn fewer times than its copies"
    # padding draws positions again, each at most once: a key gets at most one extra per copy
    assert sum(extra.values()) == pad and all(extra[k] <= c for k, c in zip(keys, copies))
    assert not any(seen[k] for k, c in zip(keys, copies) if c == 0)  # filtered out by balancing
    if world > 1:  # ranks draw disjoint positions: a key with one copy is drawn by one rank only
        singles = [k for k, c in zip(keys, copies) if c == 1 and extra[k] == 0]
        assert all(sum(1 for r in per_rank if r[k]) == 1 for k in singles)


class WholeManifest(Manifest):
    """The old behaviour behind the same interface: every block read up front and held for the whole epoch."""

    def __init__(self, streamed: Manifest) -> None:
        super().__init__(streamed.uri, streamed.index)
        self.blocks = {name: Manifest.block(self, name) for name in self.shards}

    def block(self, shard_name: str) -> dict | None:
        return self.blocks.get(shard_name)

    def release(self, block: dict | None) -> None:
        pass


class FetchLog(Manifest):
    """The streamed reader, recording which shards' blocks it fetched."""

    def __init__(self, streamed: Manifest) -> None:
        super().__init__(streamed.uri, streamed.index)
        self.fetched: list[str] = []

    def block(self, shard_name: str) -> dict | None:
        self.fetched.append(shard_name)
        return super().block(shard_name)


def draws(copies: Copies, uris: list[str], world: int, workers: int, epoch: int,
          ranks: list[int] | None = None) -> dict[tuple[int, int], list]:
    """Per (rank, worker): the keys and targets it draws in ``epoch``, in order (one epoch over the pseudo set)."""
    catalog = ShardCatalog.of(uris)
    stream = Stream(uris, copies.sizes(uris, catalog), copies, catalog, shuffle=True, shuffle_buffer=20)
    steps = -(-stream.total // 12)
    data = TrainBatches([stream], [12], steps, 0, world, seed=7, first_epoch=0, image_size=8, targets=[None])
    out = {}
    for rank in range(world) if ranks is None else ranks:
        data.rank = rank
        for worker in range(workers):
            out[rank, worker] = [(s["__key__"], int(s["pseudo"]["classes"]), s["pseudo"]["probs"].tolist())
                                 for b in data.epoch_items(epoch, worker, workers)[0] for s in b]
    return out


@pytest.mark.parametrize("world,workers", [(1, 1), (2, 2)])
def test_the_manifest_is_read_per_shard_by_each_rank_and_draws_what_the_whole_manifest_did(
        tmp_path: Path, world: int, workers: int) -> None:
    """Entries held at once by the reader stay one shard's whatever the manifest size; each rank fetches only the
    blocks of its own shards; the draws of an epoch equal, in order, those of the whole manifest held in memory."""
    peaks = {}
    for n in (300, 3000):
        uris, keys = write_shards(tmp_path / str(n), "u", n, 50)
        copies = [int(c) for c in np.random.default_rng(n).choice([0, 1, 2, 3], size=n)]
        streamed = manifest_copies(uris, keys, copies, 50).manifest
        whole = WholeManifest(streamed)
        assert whole.peak_rows_held == streamed.rows > 3 * n // 5  # the old behaviour held every entry
        expected = draws(Copies(whole), uris, world, workers, epoch=1)

        fetched = {}
        for rank in range(world):
            log = FetchLog(streamed)
            got = draws(Copies(log), uris, world, workers, epoch=1, ranks=[rank])
            assert all(got[rank, w] == expected[rank, w] for w in range(workers))
            assert log.rows_held == 0
            peaks[n] = max(peaks.get(n, 0), log.peak_rows_held)
            fetched[rank] = set(log.fetched)
        seen = Counter(k for d in expected.values() for k, _, _ in d)
        # one epoch: every key its copies, plus the last step's rounding drawn again
        assert all(seen[k] >= c for k, c in zip(keys, copies)) and not any(seen[k] for k, c in zip(keys, copies) if not c)
        assert sum(seen.values()) - sum(copies) < 12
        assert all(int(k.rsplit("-", 1)[1]) % 10 == cls for d in expected.values() for k, cls, _ in d)
        if world > 1 and n > 300:  # a rank's share: about 1/world of the shards (a boundary shard is shared)
            assert all(len(f) <= len(uris) // world + 2 for f in fetched.values())
    # at most one shard's entries (50 samples per shard) at both sizes, not the manifest's 10× more rows
    assert max(peaks.values()) <= 50


def test_epochs_reshuffle_and_are_reproducible(tmp_path: Path) -> None:
    uris, keys = write_shards(tmp_path, "u", 200, 40)
    data = TrainBatches([stream_of(uris)], [20], 10, 0, 2, seed=1, first_epoch=0, image_size=8, targets=[None])

    def order(epoch: int) -> list[str]:
        return [s["__key__"] for b in data.epoch_items(epoch, 0, 1)[0] for s in b]

    assert order(3) == order(3)
    assert order(3) != order(4)
    first_shard_keys = set(keys[:40])
    head = order(3)[:40]
    assert len(set(head) - first_shard_keys) > 0  # the buffer mixes shards


def test_the_smaller_set_cycles_and_a_rank_reads_only_its_shards(tmp_path: Path) -> None:
    uris, keys = write_shards(tmp_path, "l", 30, 10, labeled=True)
    data = TrainBatches([stream_of(uris)], [4], 20, 0, 2, seed=0, first_epoch=0, image_size=8, targets=[None])
    per_rank = epoch_keys(data, 0, 2, 1, 0)
    seen = sum(per_rank, Counter())
    assert sum(seen.values()) == 80 and set(seen) == set(keys)
    assert max(seen.values()) - min(seen.values()) <= 2
    lo, hi = split_range(0, 30, [2, 2])[0]
    touched = {s.uri for s in segments_of([0, 1, 2], uris, [10, 10, 10], lo, hi)}
    assert touched == set(uris[:2])  # positions 0..15 lie in the first two shards only


def test_train_batches_decode_and_target_real_images(tmp_path: Path) -> None:
    luris, _ = write_shards(tmp_path, "l", 20, 10, labeled=True)
    uuris, ukeys = write_shards(tmp_path, "u", 30, 10)
    copies = manifest_copies(uuris, ukeys, [1] * 30, 10)
    targets = [lambda samples: torch.tensor([float(s["label"]) for s in samples])[:, None].expand(-1, 3),
               lambda samples: torch.tensor([float(s["pseudo"]["classes"]) for s in samples])[:, None].expand(-1, 3)]
    data = TrainBatches([stream_of(luris), stream_of(uuris, copies)], [4, 8], 4, 0, 1, seed=0, first_epoch=0,
                        image_size=16, targets=targets, padding=2)
    steps = list(data)
    assert len(steps) == 4
    for x, y, n_labeled in steps:
        assert x.shape == (12, 3, 16, 16) and x.dtype == torch.uint8 and n_labeled == 4
        assert y.shape == (12, 3)
        assert ((y[:4] >= 0) & (y[:4] < 10)).all() and ((y[4:] >= 0) & (y[4:] < 10)).all()


@pytest.mark.parametrize("hflip", [False, True])
def test_train_batches_mirror_half_the_images_only_when_asked(tmp_path: Path, hflip: bool) -> None:
    ramp = np.tile(np.arange(0, 240, 30, dtype=np.uint8), (8, 1))  # brighter to the right
    uris, _ = write_shards(tmp_path, "ramp", 200, 50, labeled=True, image=ramp)
    data = TrainBatches([stream_of(uris)], [20], 10, 0, 1, seed=0, first_epoch=0, image_size=8,
                        targets=[lambda samples: torch.zeros(len(samples))], hflip=hflip)
    x = torch.cat([x for x, _, _ in data])
    as_stored = torch.from_numpy(ramp).expand(3, 8, 8)
    mirrored = (x == as_stored.flip(-1)).flatten(1).all(1)
    assert ((x == as_stored).flatten(1).all(1) ^ mirrored).all()
    assert (70 < int(mirrored.sum()) < 130) if hflip else not mirrored.any()


def test_corrupt_png_names_shard_and_key(tmp_path: Path) -> None:
    store = FileStore()
    with ShardWriter(store, f"file://{tmp_path}/bad-%06d.tar", 10) as w:
        w.write("ok-1", encode_png(np.zeros((8, 8), np.uint8)), 1)
        w.write("broken-2", encode_png(np.zeros((8, 8), np.uint8))[:30], 2)
    stream = stream_of(w.uris, shuffle=False)
    with pytest.raises(DataError, match=r"bad-000000\.tar: sample 'broken-2': cannot decode image"):
        list(ImageBatches(stream, 8, 8, positions=(0, 2)))


def _tar_members(n: int) -> tuple[bytes, list[int]]:
    """A tar of ``n`` samples and the byte offset where each member's header starts."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            data = encode_png(np.full((8, 8), i, np.uint8))
            info = tarfile.TarInfo(f"k-{i}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return data, [m.offset for m in tar.getmembers()]


def test_truncated_tar_names_shard_and_last_key(tmp_path: Path) -> None:
    data, offsets = _tar_members(4)
    at_boundary = tmp_path / "cut-000000.tar"
    at_boundary.write_bytes(data[: offsets[3]])  # three whole samples, no end-of-archive marker
    with pytest.raises(DataError, match=r"cut-000000\.tar: truncated tar shard: no end-of-archive marker after "
                                        r"member 'k-2\.png'"):
        list(stream_samples([f"file://{at_boundary}"]))
    inside = tmp_path / "cut-000001.tar"
    inside.write_bytes(data[: offsets[2] + 512 + 30])  # inside the third member's data
    with pytest.raises(DataError, match=r"cut-000001\.tar: truncated tar shard: member 'k-2\.png' is cut short"):
        list(stream_samples([f"file://{inside}"]))
    whole = tmp_path / "whole-000000.tar"
    whole.write_bytes(data)
    assert [s["__key__"] for s in stream_samples([f"file://{whole}"])] == ["k-0", "k-1", "k-2", "k-3"]


def test_digest_mismatch_names_the_shard(tmp_path: Path) -> None:
    uris, _ = write_shards(tmp_path, "u", 20, 10)
    path = Path(uris[1].removeprefix("file://"))
    data = bytearray(path.read_bytes())
    data[600] ^= 0xFF  # inside the first PNG: the tar is still well formed
    path.write_bytes(bytes(data))
    catalog = ShardCatalog.of(uris)
    assert catalog.digest(uris[0]) == hashlib.sha256(Path(uris[0].removeprefix("file://")).read_bytes()).hexdigest()
    samples = stream_samples(uris, catalog=catalog)
    assert [next(samples)["__url__"] for _ in range(10)] == [uris[0]] * 10  # the intact shard reads
    with pytest.raises(DataError, match=r"u-000001\.tar: sha256 digest mismatch"):
        next(samples)


def test_manifest_key_missing_from_its_shard_names_both(tmp_path: Path) -> None:
    uris, keys = write_shards(tmp_path, "u", 10, 10)
    copies = manifest_copies(uris, keys[:3] + ["gone-1"] + keys[4:], [0, 0, 1, 2] + [0] * 6, 10)
    with pytest.raises(DataError, match=r"u-000000\.tar: sample 'gone-1' of the pseudo-label manifest is not in"):
        list(stream_of(uris, copies).items(0, 3, None, 0, 0))


class RowTargets:
    """The key's number of each sample, as the target (picklable for worker processes)."""

    def __call__(self, samples: list[dict]) -> torch.Tensor:
        return torch.tensor([[float(row(s))] for s in samples])


def row(sample: dict) -> int:
    return int(sample["__key__"].rsplit("-", 1)[1])


def test_persistent_workers_draw_each_epochs_planned_samples(tmp_path: Path) -> None:
    uris, keys = write_shards(tmp_path, "u", 120, 20)
    copies = manifest_copies(uris, keys, [1, 2, 0] * 40, 20)
    stream = stream_of(uris, copies)
    data = TrainBatches([stream], [10], 12, 0, 1, seed=3, first_epoch=4, image_size=8, targets=[RowTargets()])
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=2, persistent_workers=True)
    sequences = []
    for epoch in (4, 5):  # resumed at epoch 4: the workers count their epochs from there
        drawn = [int(r) for _, y, _ in loader for r in y[:, 0]]
        per_worker = [[[row(s) for s in b] for b in data.epoch_items(epoch, w, 2)[0]] for w in range(2)]
        planned = [r for pair in zip(*per_worker) for b in pair for r in b]  # the loader takes workers in turn
        assert drawn == planned and len(drawn) == 120
        sequences.append(drawn)
    assert sequences[0] != sequences[1] and sorted(sequences[0]) == sorted(sequences[1])
