"""WebDataset-style tar shards of images, written and read through an ArtifactStore.

Each sample is a pair of tar members sharing a key: ``<key>.png`` (the
image) and ``<key>.cls`` (the class index as ASCII text). Unlabeled shards
have no ``.cls`` members. Keys are unique strings without dots or slashes,
such as ``mnist-000123``. Shards are written whole (one PUT per shard);
reading is :mod:`.pipeline`'s (this module's readers are thin conveniences
over it).

This module does not import torch.

Example::

    python -c "from noisy_student_workloads.shards import load_shards; \
print(load_shards(['file:///tmp/digits/labeled-000000.tar'])[2])"
"""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .pipeline import IMAGE_EXTENSIONS, ShardCatalog, stream_samples
from .store import ArtifactStore, expand_shards

log = logging.getLogger(__name__)

UNLABELED = -1


@dataclass(frozen=True)
class Sample:
    """One image of a shard: its key, encoded image bytes and class (None if unlabeled)."""

    key: str
    image: bytes
    label: int | None


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 H×W (grayscale) or H×W×C (RGB/RGBA) array."""
    if image.dtype != np.uint8:
        raise ValueError(f"image dtype must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes into a fully loaded PIL image."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _check_key(key: str) -> None:
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be non-empty without '.' or '/'")


class ShardWriter:
    """Writes samples into tar shards named by ``uri_pattern % shard_index``.

    Each shard is assembled in memory and written with one ``put_bytes``, so
    it appears complete or not at all. Tar headers carry no timestamps or
    owners: the same samples always give byte-identical shards.

    Usage::

        with ShardWriter(store, "s3://b/data/labeled-%06d.tar", 1000) as w:
            w.write("mnist-000001", png_bytes, 7)
        w.uris, w.counts, w.sha256  # the shards written, samples and digest of each
    """

    def __init__(self, store: ArtifactStore, uri_pattern: str, max_samples_per_shard: int) -> None:
        if max_samples_per_shard < 1:
            raise ValueError(f"max_samples_per_shard must be at least 1, got {max_samples_per_shard}")
        try:
            uri_pattern % 0
        except TypeError as exc:
            raise ValueError(f"shard pattern {uri_pattern!r} needs one %d-style field, e.g. -%06d.tar") from exc
        self.store = store
        self.uri_pattern = uri_pattern
        self.max_samples_per_shard = max_samples_per_shard
        self.uris: list[str] = []
        self.counts: list[int] = []
        self.sha256: list[str] = []
        self._keys: set[str] = set()
        self._buf: io.BytesIO | None = None
        self._tar: tarfile.TarFile | None = None
        self._in_shard = 0

    def write(self, key: str, image: bytes, label: int | None = None, image_ext: str = "png") -> None:
        """Add one sample; ``label=None`` writes no ``.cls`` member."""
        _check_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r}")
        if image_ext not in IMAGE_EXTENSIONS:
            raise ValueError(f"image extension {image_ext!r} is not one of {IMAGE_EXTENSIONS}")
        if label is not None and (int(label) != label or label < 0):
            raise ValueError(f"label of {key!r} must be a non-negative integer, got {label!r}")
        self._keys.add(key)
        if self._tar is None:
            self._buf = io.BytesIO()
            self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.USTAR_FORMAT)
        self._add(f"{key}.{image_ext}", image)
        if label is not None:
            self._add(f"{key}.cls", str(int(label)).encode("ascii"))
        self._in_shard += 1
        if self._in_shard >= self.max_samples_per_shard:
            self.flush()

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = 0o644
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(data))

    def flush(self) -> None:
        """Write the current shard (if it holds any sample)."""
        if self._tar is None or self._buf is None:
            return
        self._tar.close()
        uri = self.uri_pattern % len(self.uris)
        data = self._buf.getvalue()
        self.store.put_bytes(uri, data)
        self.sha256.append(hashlib.sha256(data).hexdigest())
        log.debug("wrote %s (%d samples)", uri, self._in_shard)
        self.uris.append(uri)
        self.counts.append(self._in_shard)
        self._tar, self._buf, self._in_shard = None, None, 0

    def close(self) -> list[str]:
        """Write the last shard and return the URIs of all shards written."""
        self.flush()
        return self.uris

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()


def iter_samples(store: ArtifactStore, shard_uri: str) -> Iterator[Sample]:
    """Stream the samples of one shard in tar order (checked: see :mod:`.pipeline`)."""
    for s in stream_samples([shard_uri], store, ShardCatalog.of([shard_uri], store)):
        yield Sample(s["__key__"], s["image"], s["label"])


def load_shards(
    uris: str | Sequence[str], store: ArtifactStore | None = None
) -> tuple[list[str], Any, np.ndarray]:
    """Decode small data sets whole, for inspection and tests (the stages stream instead).

    ``uris`` is a list of shard URIs or a pattern for :func:`expand_shards`.
    Returns ``(keys, images, labels)``: ``images`` is a uint8 array N×H×W×C
    when all images share size and mode, otherwise a list of PIL images;
    ``labels`` is an int64 array with ``-1`` for unlabeled samples.
    """
    if isinstance(uris, str):
        uris = expand_shards(uris, store)
    uris = list(uris)
    if not uris:
        raise ValueError("no shards to load")
    rows = [(s["__key__"], decode_image(s["image"]), UNLABELED if s["label"] is None else s["label"])
            for s in stream_samples(uris, store, ShardCatalog.of(uris, store))]
    keys = [k for k, _, _ in rows]
    labels = np.asarray([y for _, _, y in rows], dtype=np.int64)
    images = [img for _, img, _ in rows]
    if len(set(keys)) != len(keys):
        dup = next(k for k, n in Counter(keys).items() if n > 1)
        raise ValueError(f"duplicate sample key {dup!r} across shards {uris[0]} ...")
    if images and len({(im.size, im.mode) for im in images}) == 1:
        stacked = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
        return keys, stacked[..., None] if stacked.ndim == 3 else stacked, labels
    return keys, images, labels


def count_samples(uris: Iterable[str], store: ArtifactStore | None = None) -> dict[str, Any]:
    """Counts of a set of shards: shards, samples, labeled, and samples per class."""
    uris = list(uris)
    if not uris:
        raise ValueError("no shards to count")
    per_class: dict[int, int] = {}
    total = labeled = 0
    for s in stream_samples(uris, store, ShardCatalog.of(uris, store)):
        total += 1
        if s["label"] is not None:
            labeled += 1
            per_class[s["label"]] = per_class.get(s["label"], 0) + 1
    return {
        "shards": len(uris),
        "samples": total,
        "labeled": labeled,
        "per_class": {str(k): v for k, v in sorted(per_class.items())},
    }
