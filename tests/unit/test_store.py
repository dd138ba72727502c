"""The file:// artifact store and shard URL expansion."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from noisy_student_workloads.store import FileStore, S3Store, expand_shards, join_uri, open_store


def test_open_store_picks_by_scheme(tmp_path: Path) -> None:
    assert isinstance(open_store(f"file://{tmp_path}"), FileStore)
    assert isinstance(open_store(str(tmp_path)), FileStore)
    assert isinstance(open_store("s3://bucket/key"), S3Store)
    with pytest.raises(ValueError, match="gs://b/k: unsupported URI scheme"):
        open_store("gs://b/k")


def test_store_imports_neither_torch_nor_eagerly_boto3() -> None:
    code = (
        "import sys, noisy_student_workloads.store as s; s.open_store('s3://b/k');"
        "print(sorted(m for m in ('boto3', 'torch', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]"]


def test_data_cli_works_without_torch(tmp_path: Path) -> None:
    # The operator image has no torch: writing and inspecting shards must not need it.
    code = (
        "import sys, importlib.abc\n"
        "class NoTorch(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from noisy_student_workloads.data import main\n"
        "from noisy_student_workloads.shards import ShardWriter, encode_png\n"
        "from noisy_student_workloads.store import FileStore\n"
        "import numpy as np\n"
        f"with ShardWriter(FileStore(), 'file://{tmp_path}/s-%06d.tar', 10) as w:\n"
        "    w.write('k-1', encode_png(np.zeros((4, 4), np.uint8)), 3)\n"
        f"sys.exit(main(['inspect', 'file://{tmp_path}/s-000000.tar', '--output', 'json']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert '"samples": 1' in out.stdout and '"3": 1' in out.stdout


def test_bytes_json_and_files_round_trip(tmp_path: Path) -> None:
    store = FileStore()
    base = f"file://{tmp_path}"
    store.put_bytes(join_uri(base, "a/b/c.bin"), b"\x00\x01")
    assert store.get_bytes(join_uri(base, "a/b/c.bin")) == b"\x00\x01"
    assert (tmp_path / "a/b/c.bin").read_bytes() == b"\x00\x01"

    store.put_json(join_uri(base, "m.json"), {"top1": 0.5, "b": [1]})
    assert store.get_json(str(tmp_path / "m.json")) == {"top1": 0.5, "b": [1]}

    src = tmp_path / "src.txt"
    src.write_text("hello")
    store.put_file(join_uri(base, "up/src.txt"), src)
    store.get_file(join_uri(base, "up/src.txt"), tmp_path / "down/dst.txt")
    assert (tmp_path / "down/dst.txt").read_text() == "hello"
    with store.open_read(join_uri(base, "up/src.txt")) as f:
        assert f.read(2) == b"he"


def test_missing_objects_name_the_uri(tmp_path: Path) -> None:
    store = FileStore()
    uri = f"file://{tmp_path}/nope.bin"
    for call in (store.get_bytes, store.open_read, lambda u: store.get_file(u, tmp_path / "x")):
        with pytest.raises(FileNotFoundError, match=f"{uri}: no such object"):
            call(uri)
    assert not store.exists(uri)
    store.put_bytes(join_uri(str(tmp_path), "bad.json"), b"{not json")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        store.get_json(str(tmp_path / "bad.json"))


def test_relative_file_uri_is_refused() -> None:
    with pytest.raises(ValueError, match="must be absolute"):
        FileStore().get_bytes("file://relative/path")


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileStore()
    uri = f"file://{tmp_path}/obj.bin"
    store.put_bytes(uri, b"old")

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        store.put_bytes(uri, b"new")
    monkeypatch.undo()
    assert store.get_bytes(uri) == b"old"  # the old object is untouched

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with FileStore._atomic_target(uri, str(tmp_path / "obj.bin")) as tmp:
            Path(tmp).write_bytes(b"partial")
            raise Boom
    assert sorted(os.listdir(tmp_path)) == ["obj.bin"]
    assert store.get_bytes(uri) == b"old"


def test_list_is_recursive_sorted_and_hides_in_flight_writes(tmp_path: Path) -> None:
    store = FileStore()
    for name in ("run/b.json", "run/a/x.bin", "run/a/y/z.bin", "runner/other.bin", "top.bin"):
        store.put_bytes(str(tmp_path / name), b"1")
    (tmp_path / "run" / ".c.json.partial-123").write_bytes(b"in flight")
    base = f"file://{tmp_path}"
    assert store.list(f"{base}/run/") == [
        f"{base}/run/a/x.bin",
        f"{base}/run/a/y/z.bin",
        f"{base}/run/b.json",
    ]
    # A plain string prefix, as on S3; plain paths are answered as plain paths.
    assert store.list(str(tmp_path / "run")) == [
        str(tmp_path / p) for p in ("run/a/x.bin", "run/a/y/z.bin", "run/b.json", "runner/other.bin")
    ]
    assert store.list(f"{base}/missing/") == []


def test_exists(tmp_path: Path) -> None:
    store = FileStore()
    store.put_bytes(str(tmp_path / "x"), b"")
    assert store.exists(f"file://{tmp_path}/x")
    assert not store.exists(f"file://{tmp_path}")  # a directory is not an object


def test_join_uri() -> None:
    assert join_uri("s3://b/run/", "gen-0", "/teacher/", "x.pt") == "s3://b/run/gen-0/teacher/x.pt"
    assert join_uri("file:///tmp", "a") == "file:///tmp/a"
    assert join_uri("/tmp/", "", "a") == "/tmp/a"


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    for split, n in (("labeled", 3), ("unlabeled", 12)):
        for i in range(n):
            (tmp_path / f"{split}-{i:06d}.tar").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "labeled-000099.tar").write_bytes(b"x")
    return tmp_path


def test_expand_braces(shard_dir: Path) -> None:
    base = f"file://{shard_dir}"
    assert expand_shards(f"{base}/labeled-{{000000..000002}}.tar") == [
        f"{base}/labeled-{i:06d}.tar" for i in range(3)
    ]
    both = expand_shards(f"{base}/{{labeled,unlabeled}}-000001.tar")
    assert both == [f"{base}/labeled-000001.tar", f"{base}/unlabeled-000001.tar"]
    assert expand_shards([f"{base}/labeled-000000.tar", f"{base}/labeled-000000.tar"]) == [
        f"{base}/labeled-000000.tar"
    ]


def test_expand_glob_in_last_component(shard_dir: Path) -> None:
    found = expand_shards(f"file://{shard_dir}/unlabeled-*.tar")
    assert found == [f"file://{shard_dir}/unlabeled-{i:06d}.tar" for i in range(12)]
    # Not recursive: sub/labeled-000099.tar does not match labeled-*.tar.
    assert len(expand_shards(str(shard_dir / "labeled-*.tar"))) == 3
    with pytest.raises(FileNotFoundError, match=r"validation-\*\.tar: no shards match"):
        expand_shards(f"file://{shard_dir}/validation-*.tar")
    with pytest.raises(ValueError, match="last path component"):
        expand_shards(f"file://{shard_dir}/*/labeled-000000.tar")


def test_missing_shard_names_the_uri(shard_dir: Path) -> None:
    pattern = f"file://{shard_dir}/labeled-{{000000..000003}}.tar"
    with pytest.raises(FileNotFoundError, match=f"file://{shard_dir}/labeled-000003.tar: shard not found"):
        expand_shards(pattern)
    assert len(expand_shards(pattern, check_exists=False)) == 4


def test_relative_paths_expand_to_absolute(shard_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(shard_dir)
    assert expand_shards("labeled-{000000..000001}.tar") == [
        str(shard_dir / "labeled-000000.tar"),
        str(shard_dir / "labeled-000001.tar"),
    ]


def test_s3_store_pickles_without_its_client() -> None:
    store = S3Store(max_attempts=5)
    clone = pickle.loads(pickle.dumps(store))
    assert clone.max_attempts == 5 and clone._client is None


def test_create_is_exclusive_delete_is_idempotent_and_sizes(tmp_path: Path) -> None:
    store = open_store(tmp_path.as_uri())
    uri = join_uri(tmp_path.as_uri(), "d/lease.json")
    assert store.create_bytes(uri, b"first")
    assert not store.create_bytes(uri, b"second")
    assert store.get_bytes(uri) == b"first"
    assert store.sizes(tmp_path.as_uri() + "/") == {uri: 5}
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["lease.json"]  # no temp files left
    store.delete(uri)
    store.delete(uri)
    assert not store.exists(uri)
