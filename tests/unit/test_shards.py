"""Shard writing/reading and dataset packing (digits, image folders, IDX files)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from noisy_student_workloads.data import main as data_main
from noisy_student_workloads.datasets import (
    load_digits_source,
    load_fashion_mnist,
    pack_dataset,
    read_idx,
    split_stratified,
)
from noisy_student_workloads.pipeline import DataError, count_samples, stream_samples
from noisy_student_workloads.shards import ShardWriter, encode_png
from noisy_student_workloads.store import FileStore, expand_shards
from shard_data import read_shards


@pytest.fixture(scope="module")
def digits_pack(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    out = f"file://{tmp_path_factory.mktemp('digits')}"
    return out, pack_dataset("digits", out, labels_per_class=10, seed=3, shard_size=400)


def test_writer_round_trip_and_shard_boundaries(tmp_path: Path) -> None:
    store = FileStore()
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    with ShardWriter(store, f"file://{tmp_path}/s-%06d.tar", 2) as writer:
        writer.write("k-0", encode_png(rgb), 4)
        writer.write("k-1", encode_png(rgb + 1), None)
        writer.write("k-2", encode_png(rgb + 2), 0)
    assert writer.uris == [f"file://{tmp_path}/s-000000.tar", f"file://{tmp_path}/s-000001.tar"]
    assert writer.counts == [2, 1]
    assert writer.sha256[0] == hashlib.sha256((tmp_path / "s-000000.tar").read_bytes()).hexdigest()
    samples = list(stream_samples(writer.uris, store))
    assert [(s["__key__"], s["label"]) for s in samples] == [("k-0", 4), ("k-1", None), ("k-2", 0)]
    keys, images, labels = read_shards(writer.uris)
    assert keys == ["k-0", "k-1", "k-2"]
    assert images.shape == (3, 2, 3, 3) and np.array_equal(images[2], rgb + 2)
    assert labels.tolist() == [4, -1, 0]


def test_writer_refuses_bad_samples(tmp_path: Path) -> None:
    writer = ShardWriter(FileStore(), f"{tmp_path}/s-%06d.tar", 10)
    writer.write("a-1", b"png", 1)
    with pytest.raises(ValueError, match="duplicate sample key 'a-1'"):
        writer.write("a-1", b"png", 1)
    with pytest.raises(ValueError, match="without '.' or '/'"):
        writer.write("a.b", b"png", 1)
    with pytest.raises(ValueError, match="non-negative integer"):
        writer.write("a-2", b"png", -3)
    with pytest.raises(ValueError, match="%d-style field"):
        ShardWriter(FileStore(), f"{tmp_path}/s.tar", 10)
    with pytest.raises(ValueError, match="at least 1"):
        ShardWriter(FileStore(), f"{tmp_path}/s-%06d.tar", 0)


def test_reading_bad_shards_names_the_shard(tmp_path: Path) -> None:
    store = FileStore()
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(DataError, match="junk.tar: not a tar shard"):
        list(stream_samples([str(tmp_path / "junk.tar")], store))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("k-1.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"3"))
    (tmp_path / "noimg.tar").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match=r"noimg.tar: sample 'k-1' has no image"):
        list(stream_samples([str(tmp_path / "noimg.tar")], store))
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        list(stream_samples([str(tmp_path / "missing.tar")], store))


def test_digits_round_trip_keys_labels_and_pixels(digits_pack: tuple[str, dict[str, Any]]) -> None:
    out, info = digits_pack
    source = load_digits_source()
    for split in ("labeled", "validation"):
        keys, images, labels = read_shards(info["patterns"][split])
        assert images.shape[1:] == (8, 8, 1) and images.dtype == np.uint8
        index = np.array([int(k.removeprefix("digits-")) for k in keys])
        assert np.array_equal(labels, source.labels[index])
        assert np.array_equal(images[..., 0], source.images[index])
    keys, images, labels = read_shards(info["patterns"]["unlabeled"])
    assert (labels == -1).all()
    all_keys = [k for s in ("labeled", "unlabeled", "validation") for k in read_shards(info["patterns"][s])[0]]
    assert len(all_keys) == len(set(all_keys)) == 1797
    assert source.images.max() == 255  # 0..16 scaled to 0..255


def test_digits_pack_metadata_and_marker(digits_pack: tuple[str, dict[str, Any]]) -> None:
    out, info = digits_pack
    store = FileStore()
    dataset = store.get_json(f"{out}/dataset.json")
    done = store.get_json(f"{out}/_DONE.json")
    assert {k: v for k, v in done.items() if k != "sha256"} == dataset
    assert dataset["num_classes"] == 10 and dataset["class_names"] == [str(i) for i in range(10)]
    assert dataset["counts"] == {"labeled": 100, "unlabeled": 1338, "validation": 359}
    assert dataset["per_class"]["labeled"] == [10] * 10
    assert sum(dataset["per_class"]["validation"]) == 359
    assert dataset["shards"]["unlabeled"] == expand_shards(dataset["patterns"]["unlabeled"])
    assert len(dataset["shards"]["unlabeled"]) == 4  # 1338 / 400
    for uri, digest in done["sha256"].items():
        assert hashlib.sha256(store.get_bytes(uri)).hexdigest() == digest


def test_stratified_validation_counts(digits_pack: tuple[str, dict[str, Any]]) -> None:
    _, info = digits_pack
    counts = np.bincount(load_digits_source().labels)
    expected = 359 * counts / counts.sum()
    assert np.all(np.abs(np.array(info["per_class"]["validation"]) - expected) < 1)
    assert count_samples(info["shards"]["validation"])["per_class"] == {
        str(c): n for c, n in enumerate(info["per_class"]["validation"])
    }


def test_unlabeled_shards_have_no_cls_members(digits_pack: tuple[str, dict[str, Any]]) -> None:
    _, info = digits_pack
    for uri in info["shards"]["unlabeled"]:
        with tarfile.open(uri.removeprefix("file://")) as tar:
            names = tar.getnames()
        assert names and all(n.endswith(".png") for n in names)
    with tarfile.open(info["shards"]["labeled"][0].removeprefix("file://")) as tar:
        assert sum(n.endswith(".cls") for n in tar.getnames()) == 100


def test_same_seed_gives_identical_shards(tmp_path: Path, digits_pack: tuple[str, dict[str, Any]]) -> None:
    _, first = digits_pack
    again = pack_dataset("digits", str(tmp_path / "again"), labels_per_class=10, seed=3, shard_size=400)
    assert list(again["sha256"].values()) == list(first["sha256"].values())
    other = pack_dataset("digits", str(tmp_path / "other"), labels_per_class=10, seed=4, shard_size=400)
    assert read_shards(other["shards"]["labeled"])[0] != read_shards(first["shards"]["labeled"])[0]


def test_repacking_is_idempotent_and_refuses_other_parameters(tmp_path: Path) -> None:
    out = str(tmp_path / "d")
    first = pack_dataset("digits", out, labels_per_class=5, seed=0, shard_size=2000)
    marker = tmp_path / "d" / "_DONE.json"
    mtime = marker.stat().st_mtime_ns
    assert pack_dataset("digits", out, labels_per_class=5, seed=0, shard_size=2000) == first
    assert marker.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="already holds a different packed dataset"):
        pack_dataset("digits", out, labels_per_class=6, seed=0, shard_size=2000)


def test_split_is_disjoint_and_complete() -> None:
    labels = np.repeat(np.arange(3), [10, 20, 30])
    split = split_stratified(labels, 3, labels_per_class=4, seed=1, validation_size=12)
    together = np.concatenate([split.labeled, split.unlabeled, split.validation])
    assert sorted(together.tolist()) == list(range(60))
    assert np.bincount(labels[split.labeled]).tolist() == [4, 4, 4]
    assert np.bincount(labels[split.validation]).tolist() == [2, 4, 6]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels_per_class": 200}, "labels_per_class 200 is larger than class '0' has"),
        ({"labels_per_class": 0}, "labels_per_class must be at least 1"),
        ({"shard_size": 0}, "shard_size must be at least 1"),
        ({"validation_size": 5000}, "validation_size must be in"),
        ({"source": "cifar"}, "source 'cifar' is not one of"),
        ({"source": "folder"}, "source 'folder' needs --path"),
    ],
)
def test_pack_errors_name_the_field(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"source": "digits", "labels_per_class": 5, "seed": 0, "shard_size": 100}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        pack_dataset(output_uri=str(tmp_path / "x"), **args)
    assert not (tmp_path / "x" / "_DONE.json").exists()


def test_labels_that_leave_nothing_unlabeled_are_refused() -> None:
    labels = np.repeat(np.arange(2), 5)
    with pytest.raises(ValueError, match="leaves no unlabeled images"):
        split_stratified(labels, 2, labels_per_class=5, seed=0)


def _write_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for name, ext in (("cat", "png"), ("dog", "jpg"), ("eel", "png")):
        (root / name).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (5, 7, 3), dtype=np.uint8)).save(root / name / f"{i}.{ext}")
    (root / "eel" / "notes.txt").write_text("ignored")


def test_image_folder_source(tmp_path: Path) -> None:
    _write_folder(tmp_path / "imgs")
    info = pack_dataset(
        "folder", str(tmp_path / "out"), labels_per_class=2, seed=0, shard_size=5, path=str(tmp_path / "imgs")
    )
    assert info["class_names"] == ["cat", "dog", "eel"]
    assert info["counts"] == {"labeled": 6, "unlabeled": 8, "validation": 4}
    assert info["image_shape"] == [5, 7, 3]
    keys, images, labels = read_shards(info["shards"]["labeled"])
    assert images.shape == (6, 5, 7, 3) and sorted(labels.tolist()) == [0, 0, 1, 1, 2, 2]
    original = np.asarray(Image.open(tmp_path / "imgs" / "cat" / "0.png"))
    _, val_images, _ = read_shards(info["shards"]["validation"] + info["shards"]["labeled"])
    packed_all = read_shards(info["shards"]["unlabeled"])[1]
    assert any(np.array_equal(original, im) for im in [*val_images, *packed_all, *images])


def test_image_folder_errors(tmp_path: Path) -> None:
    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(ValueError, match="at least two class sub-directories"):
        pack_dataset("folder", str(tmp_path / "o"), 1, 0, 10, path=str(tmp_path / "one"))
    (tmp_path / "one" / "empty").mkdir()
    with pytest.raises(ValueError, match="class 'empty' holds no .png/.jpg images"):
        pack_dataset("folder", str(tmp_path / "o"), 1, 0, 10, path=str(tmp_path / "one"))


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_fashion_mnist_from_idx_files_gzipped_or_not(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 255, (40, 4, 4)), rng.integers(0, 255, (20, 4, 4))
    train_y, test_y = np.tile(np.arange(10), 4), np.tile(np.arange(10), 2)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(train_x)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(train_y))
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx(test_x))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(test_y)))
    assert np.array_equal(read_idx(str(tmp_path / "train-images-idx3-ubyte.gz")), train_x)
    source = load_fashion_mnist(str(tmp_path))
    assert source.class_names[0] == "T-shirt/top" and len(source.labels) == 40
    # tune on validation (10 % of the training images), report on the test split, never chosen by
    info = pack_dataset("fashion-mnist", str(tmp_path / "out"), 1, 0, 100, path=str(tmp_path))
    assert info["counts"] == {"labeled": 10, "unlabeled": 26, "validation": 4, "test": 20}
    keys, images, labels = read_shards(info["shards"]["test"])
    assert all(k.startswith("fashion-mnist-test-") for k in keys)
    index = np.array([int(k.rsplit("-", 1)[1]) for k in keys])
    assert np.array_equal(images[..., 0], test_x[index]) and np.array_equal(labels, test_y[index])
    validation = read_shards(info["shards"]["validation"])[0]
    assert not any("test" in k for k in validation)  # carved from the training images
    assert info["patterns"]["test"].endswith("test-000000.tar")
    # without a test split: validation is (a stratified subset of) the test split, as before
    small = pack_dataset("fashion-mnist", str(tmp_path / "small"), 1, 0, 100, path=str(tmp_path), validation_size=10,
                         test_split=False)
    assert small["per_class"]["validation"] == [1] * 10 and "test" not in small["counts"]
    assert all(k.startswith("fashion-mnist-test-") for k in read_shards(small["shards"]["validation"])[0])


def test_fashion_mnist_missing_or_corrupt_idx_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\(\.gz\): Fashion-MNIST IDX file not found"):
        load_fashion_mnist(str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03garbage")
    with pytest.raises(ValueError, match="train-images-idx3-ubyte: not an unsigned-byte IDX file"):
        read_idx(str(tmp_path / "train-images-idx3-ubyte"))


def test_cli_pack_and_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = f"file://{tmp_path}/cli"
    argv = ["pack", "--source", "digits", "--labels-per-class", "3", "--seed", "1", "--shard-size", "1000"]
    assert data_main([*argv, "--output", out]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["counts"]["labeled"] == 30
    assert data_main(["inspect", f"{out}/unlabeled-*.tar", "--output", "json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["samples"] == summary["counts"]["unlabeled"] and counts["labeled"] == 0
    assert data_main(["inspect", f"{out}/labeled-{{000000..000001}}.tar"]) == 1
    assert "labeled-000001.tar: shard not found" in capsys.readouterr().err
    assert data_main([*argv[:4], "999", "--output", str(tmp_path / "bad")]) == 1
    assert "labels_per_class 999 is larger" in capsys.readouterr().err
