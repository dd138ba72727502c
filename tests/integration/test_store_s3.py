"""The s3:// artifact store against a real S3 server (SeaweedFS) on loopback."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
import pytest
from s3_server import NO_LIST, WRITE_ONLY, S3Server
from shard_data import read_shards

from noisy_student_workloads.datasets import pack_dataset
from noisy_student_workloads.pipeline import stream_samples
from noisy_student_workloads.shards import ShardWriter, encode_png
from noisy_student_workloads.store import S3Store, expand_shards, join_uri, open_store

pytestmark = pytest.mark.integration


def test_bytes_json_exists_and_list(s3_prefix: str) -> None:
    store = open_store(s3_prefix)
    assert isinstance(store, S3Store)
    store.put_bytes(join_uri(s3_prefix, "a/x.bin"), b"\x00\x01\x02")
    store.put_json(join_uri(s3_prefix, "a/b/m.json"), {"top1": 0.75})
    store.put_bytes(join_uri(s3_prefix, "c.bin"), b"")
    assert store.get_bytes(join_uri(s3_prefix, "a/x.bin")) == b"\x00\x01\x02"
    assert store.get_json(join_uri(s3_prefix, "a/b/m.json")) == {"top1": 0.75}
    assert store.exists(join_uri(s3_prefix, "c.bin"))
    assert not store.exists(join_uri(s3_prefix, "nope.bin"))
    assert store.list(s3_prefix) == [
        join_uri(s3_prefix, "a/b/m.json"),
        join_uri(s3_prefix, "a/x.bin"),
        join_uri(s3_prefix, "c.bin"),
    ]
    assert store.list(join_uri(s3_prefix, "missing/")) == []


def test_missing_object_names_the_uri(s3_prefix: str, tmp_path: Path) -> None:
    store = open_store(s3_prefix)
    uri = join_uri(s3_prefix, "absent.bin")
    with pytest.raises(FileNotFoundError, match=f"{uri}: no such object"):
        store.get_bytes(uri)
    with pytest.raises(FileNotFoundError, match=f"{uri}: no such object"):
        store.open_read(uri)
    with pytest.raises(FileNotFoundError, match=f"{uri}: no such object"):
        store.get_file(uri, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no-such-bucket"):
        store.get_bytes("s3://no-such-bucket/k")


def test_files_round_trip_including_multipart(s3_prefix: str, tmp_path: Path) -> None:
    store = S3Store()
    store.MULTIPART_THRESHOLD = 5 * 1024 * 1024  # force a multipart upload (5 MiB parts)
    big = tmp_path / "big.bin"
    payload = np.random.default_rng(0).integers(0, 255, 12 * 1024 * 1024, dtype=np.uint8).tobytes()
    big.write_bytes(payload)
    store.put_file(join_uri(s3_prefix, "ckpt/big.bin"), big)
    store.get_file(join_uri(s3_prefix, "ckpt/big.bin"), tmp_path / "down" / "big.bin")
    assert (tmp_path / "down" / "big.bin").read_bytes() == payload
    with pytest.raises(FileNotFoundError, match="nothing.bin"):
        store.put_file(join_uri(s3_prefix, "x"), tmp_path / "nothing.bin")


def test_streaming_shard_read_and_glob(s3_prefix: str) -> None:
    store = open_store(s3_prefix)
    image = np.zeros((6, 6), dtype=np.uint8)
    with ShardWriter(store, join_uri(s3_prefix, "unlabeled-%06d.tar"), 3) as writer:
        for i in range(7):
            writer.write(f"img-{i:03d}", encode_png(image + i), None)
    assert len(writer.uris) == 3
    found = expand_shards(join_uri(s3_prefix, "unlabeled-*.tar"))
    assert found == writer.uris
    assert expand_shards(join_uri(s3_prefix, "unlabeled-{000000..000002}.tar")) == writer.uris
    with pytest.raises(FileNotFoundError, match="unlabeled-000003.tar: shard not found"):
        expand_shards(join_uri(s3_prefix, "unlabeled-{000000..000003}.tar"))
    samples = list(stream_samples([writer.uris[1]], store))
    assert [s["__key__"] for s in samples] == ["img-003", "img-004", "img-005"]
    assert all(s["label"] is None for s in samples)


def test_pack_to_s3_and_read_back(s3_prefix: str) -> None:
    out = join_uri(s3_prefix, "digits")
    info = pack_dataset("digits", out, labels_per_class=5, seed=0, shard_size=600)
    store = open_store(out)
    assert store.exists(join_uri(out, "_DONE.json"))
    assert store.get_json(join_uri(out, "dataset.json"))["counts"] == info["counts"]
    keys, images, labels = read_shards(info["patterns"]["labeled"])
    assert len(keys) == 50 and images.shape == (50, 8, 8, 1)
    assert np.bincount(labels).tolist() == [5] * 10
    unlabeled = read_shards(info["patterns"]["unlabeled"])
    assert len(unlabeled[0]) == info["counts"]["unlabeled"] and (unlabeled[2] == -1).all()


def test_retries_and_signature_are_configured(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "6")
    store = open_store(f"s3://{s3_env.bucket}/x")
    assert isinstance(store, S3Store)
    config = store.client.meta.config
    assert store.retry_config["mode"] == "standard"
    assert store.retry_config["total_max_attempts"] == 6
    assert config.signature_version == "s3v4"
    assert store.client.meta.endpoint_url == s3_env.endpoint_url


def test_service_specific_endpoint_wins(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_env.endpoint_url)
    store = open_store(f"s3://{s3_env.bucket}/x")
    store.put_bytes(f"s3://{s3_env.bucket}/endpoint-check", b"ok")
    assert store.get_bytes(f"s3://{s3_env.bucket}/endpoint-check") == b"ok"


def test_presigned_url_with_sigv4(s3_prefix: str) -> None:
    store = open_store(s3_prefix)
    assert isinstance(store, S3Store)
    uri = join_uri(s3_prefix, "shared.txt")
    store.put_bytes(uri, b"presigned")
    url = store.presign_get(uri, expires_s=60)
    assert "X-Amz-Signature=" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"presigned"


def test_wrong_credentials_are_rejected(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
    store = open_store(f"s3://{s3_env.bucket}/x")
    with pytest.raises(OSError, match=f"s3://{s3_env.bucket}/denied.bin"):
        store.put_bytes(f"s3://{s3_env.bucket}/denied.bin", b"x")


def test_what_s3_answers_a_key_without_list_or_read(s3_env: S3Server, s3_prefix: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """AWS answers 403 for a missing key to a key without s3:ListBucket; SeaweedFS answers 404 (a
    missing marker reads as missing), and 403 only to a key that may not read at all."""
    present, missing = join_uri(s3_prefix, "present.json"), join_uri(s3_prefix, "missing.json")
    open_store(s3_prefix).put_json(present, {})
    for name, value in s3_env.env(NO_LIST).items():
        monkeypatch.setenv(name, value)
    store = open_store(s3_prefix)
    assert store.exists(present) and not store.exists(missing)
    with pytest.raises(OSError, match="AccessDenied"):
        store.list(s3_prefix)
    for name, value in s3_env.env(WRITE_ONLY).items():
        monkeypatch.setenv(name, value)
    store = open_store(s3_prefix)
    for uri in (present, missing):
        with pytest.raises(OSError, match=f"{uri}: .*403"):
            store.exists(uri)


def test_create_delete_and_sizes(s3_prefix: str) -> None:
    store = open_store(s3_prefix)
    uri = join_uri(s3_prefix, "lease.json")
    assert store.create_bytes(uri, b"first")
    assert not store.create_bytes(uri, b"second")
    assert store.get_bytes(uri) == b"first"
    assert store.sizes(s3_prefix) == {uri: 5}
    store.delete(uri)
    store.delete(uri)  # deleting what is gone is not an error
    assert not store.exists(uri)
    assert store.create_bytes(uri, b"third")
