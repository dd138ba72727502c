"""Writing WebDataset-style tar shards of images through an ArtifactStore.

Each sample is a pair of tar members sharing a key: ``<key>.png`` (the
image) and ``<key>.cls`` (the class index as ASCII text). Unlabeled shards
have no ``.cls`` members. Keys are unique strings without dots or slashes,
such as ``mnist-000123``. Shards are written whole (one PUT per shard);
reading is :mod:`.pipeline`'s, the one data path of every stage and of
``noisy-student data inspect``.

This module does not import torch.

Example::

    python -c "import numpy as np; from noisy_student_workloads.store import FileStore; \
from noisy_student_workloads.shards import ShardWriter, encode_png; \
w = ShardWriter(FileStore(), 'file:///tmp/demo/s-%06d.tar', 10); w.write('k-1', encode_png(np.zeros((8, 8), np.uint8)), 3); \
print(w.close())"
"""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile

import numpy as np
from PIL import Image

from .pipeline import IMAGE_EXTENSIONS
from .store import ArtifactStore

log = logging.getLogger(__name__)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 H×W (grayscale) or H×W×C (RGB/RGBA) array."""
    if image.dtype != np.uint8:
        raise ValueError(f"image dtype must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


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
