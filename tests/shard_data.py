"""What packed shards hold, for assertions: every sample read through the workloads' own data path.

Reading is `noisy_student_workloads.pipeline.stream_samples` (checked against
the packing marker, as every stage reads) and its `decode_image`; this module
only stacks the results for tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from noisy_student_workloads.pipeline import ShardCatalog, decode_image, stream_samples
from noisy_student_workloads.store import expand_shards

UNLABELED = -1


def read_shards(uris: str | Sequence[str]) -> tuple[list[str], Any, np.ndarray]:
    """``(keys, images, labels)`` of shards (URIs or a pattern): images N×H×W×C uint8 when they share size and
    mode (else a list of PIL images), labels int64 with -1 for unlabeled samples."""
    uris = expand_shards(uris) if isinstance(uris, str) else list(uris)
    samples = list(stream_samples(uris, catalog=ShardCatalog.of(uris)))
    images = [decode_image(s["image"]) for s in samples]
    labels = np.asarray([UNLABELED if s["label"] is None else s["label"] for s in samples], dtype=np.int64)
    keys = [s["__key__"] for s in samples]
    if images and len({(im.size, im.mode) for im in images}) == 1:
        stacked = np.stack([np.asarray(im, dtype=np.uint8) for im in images])
        return keys, stacked[..., None] if stacked.ndim == 3 else stacked, labels
    return keys, images, labels
