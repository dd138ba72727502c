"""The balance stage's output format, the pseudo-label manifest: one block per unlabeled shard, and an index.

Training reads the unlabeled shards as a stream, a few at a time, in an
order shuffled per epoch; the manifest is laid out so that it reads alongside
them, one shard's entries at a time, and nothing of it grows with the
unlabeled set except the index (one line per shard):

* ``manifest/<shard name>.npz`` (say ``manifest/unlabeled-000012.tar.npz``):
  the images of that shard that balancing kept, in tar order — ``keys``
  (bytes), ``classes`` (int32), ``copies`` (int32, ≥ 1) and the teacher's
  soft distribution, ``probs`` (float16 N×K) or ``topk_indices`` /
  ``topk_values``. A shard of which nothing was kept has no block;
* ``manifest.json``, the index, written last: ``format``, ``num_classes``,
  ``rows`` (images kept), ``images`` (copies, what a student epoch sees) and
  per shard name its block's ``rows``, ``copies`` and ``sha256``.

:class:`ManifestWriter` (balance) writes a shard's block as soon as every
prediction of that shard has gone past, so it holds only the kept rows of
the shards still open; :class:`Manifest` (training) reads the index, and a
block when its shard is read, checked against its digest. Both are the only
code that knows the layout.

Example::

    python -c "from noisy_student_workloads.manifest import Manifest; \\
        m = Manifest.open('file:///tmp/run/stages/balance/KEY/manifest.json'); print(m.rows, m.images)"
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from .config import ConfigError
from .stage import put, put_json, sha256
from .store import join_uri, open_store

FORMAT = 2
INDEX = "manifest.json"
#: Columns of a block besides ``keys`` and ``copies``: what a student's targets are made of.
TARGET_COLUMNS = ("classes", "probs", "topk_indices", "topk_values")


def block_name(shard_name: str) -> str:
    """``manifest/unlabeled-000012.tar.npz``: the block of shard ``unlabeled-000012.tar``, relative to the index."""
    return f"manifest/{shard_name}.npz"


class ManifestWriter:
    """Writes the kept rows of a label stage's predictions, which arrive part by part, as per-shard blocks.

    ``shard_rows[i]`` is how many predictions shard ``shard_names[i]`` has in
    all; once that many have gone past (kept or not), the shard's block is
    written and forgotten. Rows of a shard must arrive in tar order (the
    label stage's order); shards may interleave (a label replica's data
    workers read several at once).
    """

    def __init__(self, output: str, shard_names: Sequence[str], shard_rows: np.ndarray, num_classes: int) -> None:
        self.output, self.num_classes = output, num_classes
        self.shard_names = [str(n) for n in shard_names]
        self.left = np.asarray(shard_rows, dtype=np.int64).copy()  # predictions not yet seen, per shard
        self.open: dict[int, list[dict[str, np.ndarray]]] = {}
        self.index: dict[str, dict[str, Any]] = {}
        self.digests: dict[str, str] = {}
        self.held = 0  # kept rows carried from part to part, waiting for their shard to end
        self.peak_held = 0

    def add(self, shard: np.ndarray, kept: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        """One part: ``shard`` (index of every prediction's shard), the ``kept`` rows, and their ``columns``
        (``keys``, ``copies``, targets)."""
        kept_shard = shard[kept]
        for i in np.unique(kept_shard).tolist():
            m = kept_shard == i
            self.open.setdefault(i, []).append({k: v[m] for k, v in columns.items()})
            self.held += int(m.sum())
        self.left -= np.bincount(shard, minlength=len(self.left))[: len(self.left)]
        if (self.left < 0).any():
            name = self.shard_names[int(np.flatnonzero(self.left < 0)[0])]
            raise ConfigError(f"labels: more predictions of shard {name} than the label stage counted")
        for i in [i for i in self.open if self.left[i] == 0]:
            self._write(i)
        self.peak_held = max(self.peak_held, self.held)

    def _write(self, i: int) -> None:
        pieces = self.open.pop(i)
        block = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
        rows = len(block["keys"])
        self.held -= rows
        if rows == 0:
            return
        buf = io.BytesIO()
        np.savez_compressed(buf, **block)
        name = block_name(self.shard_names[i])
        data = buf.getvalue()
        put(join_uri(self.output, name), data, self.digests)
        self.index[self.shard_names[i]] = {"file": name, "rows": rows, "copies": int(block["copies"].sum()),
                                           "sha256": sha256(data)}

    def close(self) -> dict[str, Any]:
        """Write what is still open (a shard with fewer predictions than counted: none normally) and then the
        index; returns the index."""
        for i in sorted(self.open):
            self._write(i)
        shards = dict(sorted(self.index.items()))
        index = {"format": FORMAT, "num_classes": self.num_classes,
                 "rows": sum(s["rows"] for s in shards.values()),
                 "images": sum(s["copies"] for s in shards.values()), "shards": shards}
        put_json(join_uri(self.output, INDEX), index, self.digests)
        return index


class Manifest:
    """The reader: the index of a balance stage's manifest, and each shard's block on demand.

    ``rows_held`` / ``peak_rows_held`` count the manifest rows this reader
    holds at once (blocks fetched and not yet released): a process holds the
    blocks of the shards it is reading, never the whole manifest.
    """

    def __init__(self, uri: str, index: dict[str, Any]) -> None:
        self.uri, self.index = uri, index
        self.shards: dict[str, dict[str, Any]] = index["shards"]
        self.rows_held = 0
        self.peak_rows_held = 0

    @classmethod
    def open(cls, uri: str) -> Manifest:
        """Read the index at ``uri`` (``…/manifest.json``); errors name ``pseudo.manifest``."""
        store = open_store(uri)
        try:
            index = store.get_json(uri)
        except FileNotFoundError as exc:
            hint = " (the manifest of an older balance stage: run balancing again)" if uri.endswith(".npz") else ""
            raise ConfigError(f"pseudo.manifest: {exc}{hint}") from None
        except ValueError as exc:
            raise ConfigError(f"pseudo.manifest: {uri} is not a manifest index: {exc}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("shards"), dict):
            raise ConfigError(f"pseudo.manifest: {uri} is not a manifest index of format {FORMAT}")
        return cls(uri, index)

    @property
    def rows(self) -> int:
        return int(self.index["rows"])

    @property
    def images(self) -> int:
        return int(self.index["images"])

    @property
    def num_classes(self) -> int:
        return int(self.index["num_classes"])

    def copies(self, shard_name: str) -> int:
        """Positions of a shard in a student epoch: the copies of its kept images (0 when none was kept)."""
        entry = self.shards.get(shard_name)
        return int(entry["copies"]) if entry else 0

    def block(self, shard_name: str) -> dict[str, np.ndarray] | None:
        """The shard's entries in tar order (``keys``, ``copies`` and target columns), checked; counted as held
        until :meth:`release`."""
        entry = self.shards.get(shard_name)
        if entry is None:
            return None
        uri = join_uri(self.uri.rsplit("/", 1)[0] + "/", entry["file"])
        try:
            raw = open_store(uri).get_bytes(uri)
        except FileNotFoundError as exc:
            raise ConfigError(f"pseudo.manifest: {exc}") from None
        if sha256(raw) != entry["sha256"]:
            raise ConfigError(f"pseudo.manifest: {uri} does not match the sha256 the index records")
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            block = {k: z[k] for k in z.files}
        self.rows_held += len(block["keys"])
        self.peak_rows_held = max(self.peak_rows_held, self.rows_held)
        return block

    def release(self, block: dict[str, np.ndarray] | None) -> None:
        if block is not None:
            self.rows_held -= len(block["keys"])
