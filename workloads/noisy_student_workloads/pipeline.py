"""The data path of every stage: shard list → split by rank and worker → read → decode → augment → batch.

Shards are WebDataset tars (``<key>.png`` + ``<key>.cls``) on ``file://`` or
``s3://``. Reading goes through our :class:`~.store.ArtifactStore` (boto3 for
S3) with read-ahead: a background thread fetches the next shards while the
current one is consumed, so at most ``READ_AHEAD + 1`` shards are in memory
whatever the size of the data set. Tar iteration, grouping of members into
samples and the shuffle buffer are the ``webdataset`` package's own stages.

Every shard is checked as it is read: its sha256 against the digest the
packer wrote next to it (``_DONE.json``), its tar structure to the
end-of-archive marker (a tar cut at a member boundary is otherwise silently
shorter), and each sample for an image and an integer class. Failures raise
:class:`DataError` naming the shard and the sample key.

Splitting. All shards of a set, in an order shared by every process (shuffled
per epoch for training), form one sequence of *positions*; a sample with
``c`` copies (balanced pseudo-labels) takes ``c`` positions, a sample left
out by balancing none. Each rank, and within it each data-loader worker,
takes a contiguous range of positions proportional to its share of the
batches, so every position is read by exactly one process per pass; a
process reads only the shards its range touches. A stream that must fill
more batches than its range holds (the smaller set of a student, the
rounding of the last batch) cycles through its range again, reshuffled.

Shard reading works without torch (the operator image has none).

Example::

    python -c "from noisy_student_workloads.pipeline import stream_samples; \
print(next(iter(stream_samples(['file:///tmp/digits/labeled-000000.tar'])))['__key__'])"
"""

from __future__ import annotations

import hashlib
import io
import itertools
import random
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from .config import ConfigError
from .manifest import TARGET_COLUMNS, Manifest
from .store import ArtifactStore, join_uri, open_store

try:  # the training and eval datasets are torch's; reading shards works without torch
    from torch.utils.data import IterableDataset
except ImportError:  # pragma: no cover - the operator image has no torch
    IterableDataset = object  # type: ignore[assignment,misc]

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")
#: Shards fetched ahead of the one being read (memory: this many shards more).
READ_AHEAD = 2
_TAR_BLOCK = 512


class DataError(ConfigError):
    """A shard or a sample cannot be used; the message names the shard and, when known, the key.

    A :class:`~.config.ConfigError`: the stage's input is unusable, so the
    entry point exits 2 with this message (no traceback).
    """


def unwrap(exc: DataError) -> DataError:
    """A DataError that a DataLoader re-raised carries the worker's traceback: keep the message only."""
    text = str(exc).strip()
    if "Original Traceback" not in text:
        return exc
    return DataError(text.splitlines()[-1].split(": ", 1)[-1])


# ---------------------------------------------------------------------------
# shard metadata: digests and sample counts the packer wrote next to the shards


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] + "/"


def _basename(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


@dataclass
class ShardCatalog:
    """What the packing marker (``_DONE.json`` beside the shards) says about each shard.

    ``sha256`` and ``samples`` are keyed by shard file name; a shard whose
    directory has no packing marker has neither (it is then read unchecked
    and counted by reading).
    """

    sha256: dict[str, str] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, uris: Sequence[str], store: ArtifactStore | None = None) -> ShardCatalog:
        catalog = cls()
        for parent in dict.fromkeys(_parent(u) for u in uris):
            marker_uri = join_uri(parent, "_DONE.json")
            s = store or open_store(marker_uri)
            if not s.exists(marker_uri):
                continue
            try:
                marker = s.get_json(marker_uri)
            except ValueError:
                continue  # not a packing marker we understand: read the shards unchecked
            if not isinstance(marker, dict):
                continue
            catalog.sha256.update({_basename(u): d for u, d in (marker.get("sha256") or {}).items()})
            catalog.samples.update({_basename(u): int(n) for u, n in (marker.get("shard_samples") or {}).items()})
        return catalog

    def digest(self, uri: str) -> str | None:
        return self.sha256.get(_basename(uri))

    def count(self, uris: Sequence[str]) -> int | None:
        """Samples in ``uris`` by the packing marker; None when it does not count every one of them."""
        counts = [self.samples.get(_basename(u)) for u in uris]
        return None if None in counts else sum(counts)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# read: whole shards with read-ahead, checked


def check_tar(data: bytes, uri: str) -> int:
    """Walk the tar headers of a shard to its end-of-archive marker; returns the member count.

    Raises :class:`DataError` naming the shard and the last complete member
    when the archive is cut (inside a member or at a member boundary) or
    holds a bad header. A header walk (name, size, checksum) rather than
    ``tarfile``: it runs on every shard read and must cost next to nothing.
    """
    if not data:
        raise DataError(f"{uri}: empty file, not a tar shard")
    pos, members, last = 0, 0, None
    view = memoryview(data)
    while True:
        header = view[pos : pos + _TAR_BLOCK]
        after = f" after member {last!r}" if last else ""
        if len(header) < _TAR_BLOCK:
            raise DataError(f"{uri}: truncated tar shard: no end-of-archive marker{after}")
        if not any(header):
            if any(view[pos + _TAR_BLOCK : pos + 2 * _TAR_BLOCK]) or len(view) < pos + 2 * _TAR_BLOCK:
                raise DataError(f"{uri}: truncated tar shard: no end-of-archive marker{after}")
            return members
        raw = bytes(header)
        name = raw[:100].split(b"\0", 1)[0].decode("utf-8", errors="replace")
        stored = raw[148:156].split(b"\0", 1)[0].strip()
        checksum = sum(raw[:148]) + 8 * 32 + sum(raw[156:])
        try:
            ok = int(stored or b"-1", 8) == checksum
            size = int(raw[124:136].split(b"\0", 1)[0].strip() or b"0", 8) if raw[124] < 0x80 else \
                int.from_bytes(raw[125:136], "big")
        except ValueError:
            ok = False
        if not ok:
            kind = "corrupt tar shard" if members else "not a tar shard"
            raise DataError(f"{uri}: {kind}: bad tar header at byte {pos}{after}")
        if pos + _TAR_BLOCK + size > len(data):
            raise DataError(f"{uri}: truncated tar shard: member {name!r} is cut short")
        pos += _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK
        members, last = members + 1, name


def fetch_shard(uri: str, store: ArtifactStore, catalog: ShardCatalog | None) -> bytes:
    """The bytes of one shard, checked against its packing digest and for truncation."""
    data = store.get_bytes(uri)
    expected = catalog.digest(uri) if catalog is not None else None
    if expected is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise DataError(f"{uri}: sha256 digest mismatch: the packing marker says {expected}, "
                            f"the shard has {actual}")
    check_tar(data, uri)
    return data


def read_ahead(
    uris: Iterable[str], store: ArtifactStore | None = None, catalog: ShardCatalog | None = None,
    depth: int = READ_AHEAD,
) -> Iterator[dict[str, Any]]:
    """``{"url", "stream"}`` per shard (WebDataset's opener contract), fetching ``depth`` shards ahead."""
    pending: deque[tuple[str, Future[bytes]]] = deque()
    todo = iter(uris)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-read-ahead") as pool:
        def fill() -> None:
            while len(pending) < depth + 1:
                uri = next(todo, None)
                if uri is None:
                    return
                pending.append((uri, pool.submit(fetch_shard, uri, store or open_store(uri), catalog)))

        fill()
        while pending:
            uri, future = pending.popleft()
            data = future.result()
            fill()
            yield {"url": uri, "stream": io.BytesIO(data)}
        # an abandoned generator: drop what was fetched ahead
        for _, future in pending:
            future.cancel()


def _checked_samples(samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Each sample gets ``image`` (bytes) and ``label`` (int or None); errors name shard and key."""
    for s in samples:
        url, key = s["__url__"], _basename(s["__key__"])
        image = next((s[e] for e in IMAGE_EXTENSIONS if e in s), None)
        if image is None:
            raise DataError(f"{url}: sample {key!r} has no image (.png/.jpg) member")
        label = None
        if "cls" in s:
            text = s["cls"].decode("ascii", errors="replace").strip()
            try:
                label = int(text)
            except ValueError as exc:
                raise DataError(f"{url}: sample {key!r} has a non-integer .cls {text!r}") from exc
        yield {"__url__": url, "__key__": key, "image": image, "label": label}


def stream_samples(
    uris: Iterable[str], store: ArtifactStore | None = None, catalog: ShardCatalog | None = None
) -> Iterator[dict[str, Any]]:
    """Every sample of ``uris`` in shard and tar order: ``__url__``, ``__key__``, ``image``, ``label``."""
    # the {} end-of-shard marker keeps a shard's last sample apart from the next shard's first
    files = wds.tariterators.tar_file_expander(read_ahead(uris, store, catalog), eof_value={})
    return _checked_samples(wds.tariterators.group_by_keys(files))


# ---------------------------------------------------------------------------
# split: contiguous ranges of positions per rank and worker


@dataclass(frozen=True)
class Segment:
    """Positions ``[start, stop)`` of shard ``uri`` (positions count copies, in tar order)."""

    uri: str
    start: int
    stop: int


def split_range(lo: int, hi: int, weights: Sequence[int]) -> list[tuple[int, int]]:
    """``[lo, hi)`` cut into contiguous ranges proportional to ``weights`` (integer cut points)."""
    total = sum(weights)
    if total <= 0:
        return [(lo, lo)] * len(weights)
    cuts, acc = [lo], 0
    for w in weights:
        acc += w
        cuts.append(lo + (hi - lo) * acc // total)
    return list(zip(cuts[:-1], cuts[1:]))


def segments_of(order: Sequence[int], uris: Sequence[str], sizes: Sequence[int], lo: int, hi: int) -> list[Segment]:
    """The pieces of shards (taken in ``order``) that positions ``[lo, hi)`` cover."""
    out, pos = [], 0
    for i in order:
        start, stop = max(lo, pos), min(hi, pos + sizes[i])
        if start < stop:
            out.append(Segment(uris[i], start - pos, stop - pos))
        pos += sizes[i]
    return out


def even_counts(total: int, parts: int) -> list[int]:
    """``total`` items dealt to ``parts`` parts, the first ones getting one more."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


# ---------------------------------------------------------------------------
# copies: which samples of a shard a stream takes, and with what target


class Copies:
    """Copies per sample: 1 each for labeled data, the balance manifest's for pseudo-labels.

    With a :class:`~.manifest.Manifest`, a shard's entries are fetched when
    the shard is read and dropped after it (the stream never holds more of
    the manifest than the blocks of the shards it reads); samples of the
    shard that the manifest does not list get no copy, the others carry
    their entry's target columns under ``pseudo``.
    """

    def __init__(self, manifest: Manifest | None = None) -> None:
        self.manifest = manifest

    def walk(self, uri: str, samples: Iterable[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], int]]:
        """``(sample, copies)`` for each sample of one shard, in tar order."""
        if self.manifest is None:
            for s in samples:
                yield s, 1
            return
        block = self.manifest.block(_basename(uri))
        try:
            keys = block["keys"] if block is not None else ()
            targets = [k for k in TARGET_COLUMNS if block is not None and k in block]
            row = 0
            for s in samples:
                if row < len(keys) and s["__key__"].encode() == keys[row]:
                    s["pseudo"] = {k: block[k][row].copy() for k in targets}  # a copy: the block is dropped
                    yield s, int(block["copies"][row])
                    row += 1
                else:
                    yield s, 0
            if row < len(keys):
                raise DataError(f"{uri}: sample {keys[row].decode()!r} of the pseudo-label manifest is not in "
                                "this shard (in tar order)")
        finally:
            self.manifest.release(block)

    def sizes(self, uris: Sequence[str], catalog: ShardCatalog | None) -> list[int]:
        """Positions of each shard: its sample count (:func:`count_shards`), or its manifest copies."""
        if self.manifest is None:
            return count_shards(uris, catalog)
        return [self.manifest.copies(_basename(u)) for u in uris]


def take_segments(
    segments: Sequence[Segment], copies: Copies, store: ArtifactStore | None = None,
    catalog: ShardCatalog | None = None,
) -> Iterator[dict[str, Any]]:
    """The samples at the positions of ``segments``, one item per copy (shards read once each, in order)."""
    by_shard: dict[str, list[Segment]] = {}
    for seg in segments:
        by_shard.setdefault(seg.uri, []).append(seg)
    seen = set()
    for uri, shard in itertools.groupby(stream_samples(list(by_shard), store, catalog), key=lambda s: s["__url__"]):
        seen.add(uri)
        pos = 0
        for s, c in copies.walk(uri, shard):
            for seg in by_shard[uri]:
                for _ in range(min(seg.stop, pos + c) - max(seg.start, pos)):
                    yield s
            pos += c
    for uri in by_shard:
        if uri not in seen:  # an empty shard: the manifest must not expect anything of it
            for _ in copies.walk(uri, ()):
                pass


# ---------------------------------------------------------------------------
# decode and batch


def decode_image(data: bytes) -> Image.Image:
    """Image bytes (PNG, JPEG) as a fully loaded PIL image in its own mode and size."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def decode(sample: dict[str, Any], image_size: int) -> Image.Image:
    """The sample's image as an RGB PIL image of ``image_size`` pixels; a corrupt image names shard and key."""
    try:
        img = decode_image(sample["image"])
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad bytes
        raise DataError(f"{sample['__url__']}: sample {sample['__key__']!r}: cannot decode image: {exc}") from exc
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    return img


def to_tensor(img: Image.Image) -> Any:
    """uint8 3×S×S tensor of an RGB PIL image."""
    import torch

    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


@dataclass
class Stream:
    """One set's samples for one process: its positions, how many items to yield, and how to read them."""

    uris: list[str]
    sizes: list[int]  # positions per shard
    copies: Copies
    catalog: ShardCatalog | None = None
    shuffle: bool = False
    shuffle_buffer: int = 1000

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def items(self, lo: int, hi: int, quota: int | None, order_seed: int, seed: int) -> Iterator[dict[str, Any]]:
        """Samples at positions ``[lo, hi)``: once (``quota`` None) or cycled until ``quota`` items.

        Shard order is shuffled with ``order_seed`` (when ``shuffle``), which
        every process of a pass shares, since positions are counted in that
        order; a buffer then shuffles samples across the shards of the range,
        with this process's ``seed``.
        """
        if quota is not None and quota > 0 and lo >= hi:
            lo, hi = 0, self.total  # a range too small to hold anything: draw from the whole set
            if lo >= hi:
                raise DataError(f"{self.uris[0] if self.uris else 'no shards'}: no samples to draw from")
        order = list(range(len(self.uris)))
        if self.shuffle:
            random.Random(order_seed).shuffle(order)
        segs = segments_of(order, self.uris, self.sizes, lo, hi)
        # A range no larger than the shuffle buffer is read once and then cycled from memory.
        small: list[dict[str, Any]] | None = [] if quota is not None and hi - lo <= self.shuffle_buffer else None
        yielded, rounds = 0, 0
        while True:
            rng = random.Random(f"{seed}-{rounds}")
            items: Iterator[dict[str, Any]]
            if small and rounds > 0:
                items = iter(rng.sample(small, len(small)) if self.shuffle else small)
            else:
                if self.shuffle and rounds > 0:
                    segs = rng.sample(segs, len(segs))
                items = take_segments(segs, self.copies, catalog=self.catalog)
                if small is not None:
                    items = _recorded(items, small)
                if self.shuffle:
                    items = wds.filters._shuffle(items, bufsize=self.shuffle_buffer, initial=self.shuffle_buffer,
                                                 rng=rng)
            for s in items:
                if quota is not None and yielded >= quota:
                    return
                yielded += 1
                yield s
            if quota is None or yielded >= quota:
                return
            rounds += 1


def _recorded(items: Iterable[dict[str, Any]], into: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for item in items:
        into.append(item)
        yield item


def count_shards(uris: Sequence[str], catalog: ShardCatalog, store: ArtifactStore | None = None) -> list[int]:
    """Samples per shard: from the packing marker when it has them, otherwise by reading the shards."""
    unknown = [u for u in uris if _basename(u) not in catalog.samples]
    read = Counter(s["__url__"] for s in stream_samples(unknown, store, catalog)) if unknown else Counter()
    return [catalog.samples.get(_basename(u), read[u]) for u in uris]


def count_samples(uris: Iterable[str], store: ArtifactStore | None = None) -> dict[str, Any]:
    """Counts of a set of shards, read whole (``noisy-student data inspect``): shards, samples, labeled, and
    samples per class."""
    uris = list(uris)
    if not uris:
        raise ValueError("no shards to count")
    per_class: Counter[int] = Counter()
    total = labeled = 0
    for s in stream_samples(uris, store, ShardCatalog.of(uris, store)):
        total += 1
        if s["label"] is not None:
            labeled += 1
            per_class[s["label"]] += 1
    return {
        "shards": len(uris),
        "samples": total,
        "labeled": labeled,
        "per_class": {str(k): v for k, v in sorted(per_class.items())},
    }


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Lists of ``size`` items (the last one may be shorter)."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch




# ---------------------------------------------------------------------------
# the datasets the stages iterate (torch)


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


def _worker() -> tuple[int, int]:
    import torch.utils.data

    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TrainBatches(IterableDataset):  # type: ignore[misc]
    """One epoch of training steps for this rank per ``iter()``: ``(uint8 images, float targets, labeled count)``.

    Each step takes a batch from every stream (labeled, then pseudo-labeled),
    ``batches[i]`` images globally, this rank's share of them. Steps are
    dealt to data-loader workers; each worker reads the positions of its
    share of the steps. Works with persistent workers: each ``iter()`` is the
    next epoch, counted from ``first_epoch``; the data of an epoch depends only
    on (``seed``, epoch), so a resumed run sees what an uninterrupted one would.
    """

    def __init__(
        self, streams: Sequence[Stream], batches: Sequence[int], steps: int, rank: int, world: int, seed: int,
        first_epoch: int, image_size: int, targets: Sequence[Any], augment: Any = None, padding: int = 0,
        hflip: bool = False,
    ) -> None:
        self.streams, self.batches, self.steps = list(streams), list(batches), steps
        self.rank, self.world, self.seed = rank, world, seed
        self.epoch = first_epoch - 1
        self.image_size, self.targets, self.augment, self.padding = image_size, list(targets), augment, padding
        self.hflip = hflip

    def __len__(self) -> int:
        return self.steps

    def epoch_items(self, epoch: int, worker: int, workers: int) -> list[Iterator[list[dict[str, Any]]]]:
        """Per stream, this (rank, worker)'s batches of samples for ``epoch``."""
        steps = even_counts(self.steps, workers)
        out = []
        for i, (stream, global_batch) in enumerate(zip(self.streams, self.batches)):
            per_rank = even_counts(global_batch, self.world)
            lo, hi = split_range(0, stream.total, per_rank)[self.rank]
            lo, hi = split_range(lo, hi, [s * per_rank[self.rank] for s in steps])[worker]
            items = stream.items(lo, hi, steps[worker] * per_rank[self.rank], order_seed=_seed(self.seed, epoch, i),
                                 seed=_seed(self.seed, epoch, i, self.rank, worker))
            out.append(batched(items, per_rank[self.rank]))
        return out

    def __iter__(self) -> Iterator[tuple[Any, Any, int]]:
        import torch

        from .images import random_crop, random_flip

        self.epoch += 1
        worker, workers = _worker()
        if _in_worker():
            # Worker processes restart on resume: their augmentation RNG is seeded per epoch,
            # not carried over (the main process's RNG is saved in checkpoints instead).
            s = _seed(self.seed, self.epoch, self.rank, worker, "augment")
            random.seed(s)
            np.random.seed(s % 2**32)
            torch.manual_seed(s)
        for batches in zip(*self.epoch_items(self.epoch, worker, workers)):
            xs, ys = [], []
            for samples, target in zip(batches, self.targets):
                images = [decode(s, self.image_size) for s in samples]
                if self.augment is not None:
                    images = [self.augment(im) for im in images]
                x = random_crop(torch.stack([to_tensor(im) for im in images]), self.padding)
                xs.append(random_flip(x) if self.hflip else x)
                ys.append(target(samples))
            yield torch.cat(xs), torch.cat(ys), len(batches[0])


def _in_worker() -> bool:
    import torch.utils.data

    return torch.utils.data.get_worker_info() is not None


class ImageBatches(IterableDataset):  # type: ignore[misc]
    """Eval-transform batches of a set, read once: ``(samples without image bytes, uint8 images)``.

    With ``positions`` (lo, hi) the workers share that range of the stream;
    without, they share its shards (labeling: no counts needed).
    """

    def __init__(self, stream: Stream, batch: int, image_size: int, positions: tuple[int, int] | None = None) -> None:
        self.stream, self.batch, self.image_size, self.positions = stream, batch, image_size, positions

    def __iter__(self) -> Iterator[tuple[list[dict[str, Any]], Any]]:
        import torch

        worker, workers = _worker()
        if self.positions is None:
            items: Iterable[dict[str, Any]] = stream_samples(self.stream.uris[worker::workers],
                                                             catalog=self.stream.catalog)
        else:
            lo, hi = split_range(*self.positions, [1] * workers)[worker]
            items = self.stream.items(lo, hi, None, 0, 0)
        for samples in batched(items, self.batch):
            x = torch.stack([to_tensor(decode(s, self.image_size)) for s in samples])
            yield [{k: v for k, v in s.items() if k != "image"} for s in samples], x
