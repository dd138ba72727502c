"""Artifact store: one small interface over ``file://`` and ``s3://`` URIs.

Every stage of a Noisy Student run reads its inputs and writes its outputs
through an :class:`ArtifactStore`; the operator reads completion markers the
same way. Writes are whole objects and atomic: a reader sees either nothing or
the complete object, never a partial one.

This module imports only the standard library at import time (boto3 is loaded
when the first ``s3://`` store is opened) because the operator image has no
torch and should stay light.

S3 endpoint, region and credentials come from the standard AWS environment
and config files (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``,
``AWS_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, ...).

Example::

    python -c "from noisy_student_workloads.store import open_store, expand_shards; \
print(expand_shards('file:///tmp/data/labeled-{000000..000001}.tar'))"
"""

from __future__ import annotations

import abc
import fnmatch
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

_TEMP_MARK = ".partial-"
_GLOB_CHARS = "*?["


class ArtifactStore(abc.ABC):
    """Whole-object storage addressed by URI (``file://...`` or ``s3://...``)."""

    @abc.abstractmethod
    def put_bytes(self, uri: str, data: bytes) -> None:
        """Write ``data`` as the complete object at ``uri`` (atomic)."""

    @abc.abstractmethod
    def get_bytes(self, uri: str) -> bytes:
        """Read the whole object; ``FileNotFoundError`` naming ``uri`` if absent."""

    @abc.abstractmethod
    def put_file(self, uri: str, path: str | os.PathLike[str]) -> None:
        """Upload a local file as the object at ``uri`` (atomic, multipart if big)."""

    @abc.abstractmethod
    def get_file(self, uri: str, path: str | os.PathLike[str]) -> None:
        """Download the object at ``uri`` to a local file (atomic on the local side)."""

    @abc.abstractmethod
    def open_read(self, uri: str) -> BinaryIO:
        """Open the object for streaming reads; the caller closes the stream."""

    @abc.abstractmethod
    def list(self, prefix_uri: str) -> list[str]:
        """Full URIs of all objects whose URI starts with ``prefix_uri``, sorted.

        The match is a plain string prefix (S3 semantics) and recursive:
        ``list("s3://b/run/")`` returns everything below ``run/``.
        """

    @abc.abstractmethod
    def exists(self, uri: str) -> bool:
        """Whether a complete object exists at ``uri``."""

    @abc.abstractmethod
    def create_bytes(self, uri: str, data: bytes) -> bool:
        """Write ``data`` at ``uri`` only if no object is there; False when one is (atomic)."""

    @abc.abstractmethod
    def delete(self, uri: str) -> None:
        """Delete the object at ``uri``; a missing object is not an error."""

    @abc.abstractmethod
    def sizes(self, prefix_uri: str) -> dict[str, int]:
        """Size in bytes of every object that ``list(prefix_uri)`` returns."""

    def put_json(self, uri: str, obj: Any) -> None:
        """Write ``obj`` as indented, key-sorted JSON."""
        self.put_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def get_json(self, uri: str) -> Any:
        """Read a JSON object; ``ValueError`` naming ``uri`` when it is not valid JSON."""
        data = self.get_bytes(uri)
        try:
            return json.loads(data)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{uri}: not valid JSON: {exc}") from exc


# ---------------------------------------------------------------------------
# file://


def _local_path(uri: str) -> str:
    """Absolute local path for a ``file://`` URI or a plain path."""
    if uri.startswith("file://"):
        path = uri[len("file://") :]
        if path.startswith("localhost/"):
            path = path[len("localhost") :]
        if not path.startswith("/"):
            raise ValueError(f"{uri}: file:// URIs must be absolute (file:///path)")
        return os.path.normpath(path) + ("/" if path.endswith("/") else "")
    if "://" in uri:
        raise ValueError(f"{uri}: not a file:// URI or local path")
    return os.path.abspath(os.path.expanduser(uri))


class FileStore(ArtifactStore):
    """Artifact store on the local file system (or a shared mount).

    Accepts ``file:///abs/path`` URIs and plain paths; ``list`` answers in the
    form it was asked (``file://`` URIs or plain absolute paths).
    """

    def put_bytes(self, uri: str, data: bytes) -> None:
        path = _local_path(uri)
        with self._atomic_target(uri, path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())

    def get_bytes(self, uri: str) -> bytes:
        with self.open_read(uri) as f:
            return f.read()

    def put_file(self, uri: str, path: str | os.PathLike[str]) -> None:
        dest = _local_path(uri)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{os.fspath(path)}: no such local file to upload to {uri}")
        with self._atomic_target(uri, dest) as tmp:
            shutil.copyfile(path, tmp)

    def get_file(self, uri: str, path: str | os.PathLike[str]) -> None:
        src = _local_path(uri)
        if not os.path.isfile(src):
            raise FileNotFoundError(f"{uri}: no such object")
        with self._atomic_target(os.fspath(path), os.path.abspath(path)) as tmp:
            shutil.copyfile(src, tmp)

    def open_read(self, uri: str) -> BinaryIO:
        path = _local_path(uri)
        try:
            return open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise FileNotFoundError(f"{uri}: no such object") from exc

    def list(self, prefix_uri: str) -> list[str]:
        prefix = _local_path(prefix_uri)
        if prefix_uri.endswith("/") and not prefix.endswith("/"):
            prefix += "/"
        root = prefix if prefix.endswith("/") else os.path.dirname(prefix)
        as_uri = prefix_uri.startswith("file://")
        found = []
        for dirpath, _dirnames, filenames in os.walk(root):
            for name in filenames:
                if name.startswith(".") and _TEMP_MARK in name:
                    continue  # an in-flight atomic write, not an object
                full = os.path.join(dirpath, name)
                if full.startswith(prefix):
                    found.append("file://" + full if as_uri else full)
        return sorted(found)

    def exists(self, uri: str) -> bool:
        return os.path.isfile(_local_path(uri))

    def create_bytes(self, uri: str, data: bytes) -> bool:
        path = _local_path(uri)
        with self._atomic_target(uri, path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o644)
            try:
                os.link(tmp, path)  # atomic and fails when the target exists, unlike rename
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        return True

    def delete(self, uri: str) -> None:
        try:
            os.unlink(_local_path(uri))
        except FileNotFoundError:
            pass

    def sizes(self, prefix_uri: str) -> dict[str, int]:
        return {uri: os.path.getsize(_local_path(uri)) for uri in self.list(prefix_uri)}

    class _atomic_target:
        """Context manager yielding a temp path next to ``path``, renamed on success."""

        def __init__(self, uri: str, path: str) -> None:
            self.uri, self.path, self.tmp = uri, path, ""

        def __enter__(self) -> str:
            parent = os.path.dirname(self.path) or "."
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError as exc:
                raise OSError(f"{self.uri}: cannot create parent directory: {exc}") from exc
            fd, self.tmp = tempfile.mkstemp(
                prefix=f".{os.path.basename(self.path)}{_TEMP_MARK}", dir=parent
            )
            os.close(fd)
            return self.tmp

        def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
            if exc_type is None and os.path.exists(self.tmp):
                try:
                    os.chmod(self.tmp, 0o644)
                    os.replace(self.tmp, self.path)
                    return
                except OSError:
                    self._discard()
                    raise
            self._discard()

        def _discard(self) -> None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass


# ---------------------------------------------------------------------------
# s3://


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` → ``(bucket, key)``; ``ValueError`` naming the URI otherwise."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"{uri}: missing bucket name (expected s3://bucket/key)")
    return bucket, key


_MISSING_CODES = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}


class S3Store(ArtifactStore):
    """Artifact store on any S3-compatible service, through boto3.

    Configuration comes from the standard AWS environment and config files.
    ``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``) selects a non-AWS
    endpoint, in which case path-style addressing is used. Transient errors
    are retried by botocore's ``standard`` retry mode (``AWS_MAX_ATTEMPTS``
    attempts, default 8). The client is created lazily and is not pickled, so
    a store can be handed to data-loader worker processes.
    """

    MULTIPART_THRESHOLD = 64 * 1024 * 1024

    def __init__(
        self, max_attempts: int | None = None, connect_timeout: float = 10.0, read_timeout: float = 60.0,
        connections: int = 10,
    ) -> None:
        self.max_attempts = max_attempts or int(os.environ.get("AWS_MAX_ATTEMPTS", "8"))
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.connections = connections  # kept open (botocore's max_pool_connections)
        self._client: Any = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"max_attempts": self.max_attempts, "connect_timeout": self.connect_timeout,
                "read_timeout": self.read_timeout, "connections": self.connections}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    @property
    def endpoint_url(self) -> str | None:
        """The configured non-AWS endpoint, if any."""
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None

    @property
    def client(self) -> Any:
        """The boto3 S3 client (created on first use)."""
        with self._lock:
            if self._client is None:
                self._client = self._make_client()
            return self._client

    def _make_client(self) -> Any:
        import boto3
        from botocore.config import Config

        endpoint = self.endpoint_url
        config = Config(
            signature_version="s3v4",
            # total_max_attempts counts the first try, like AWS_MAX_ATTEMPTS
            # (botocore's max_attempts key counts retries only).
            retries={"mode": "standard", "total_max_attempts": self.max_attempts},
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            max_pool_connections=self.connections,
            # Self-hosted S3 servers rarely resolve bucket.host names.
            s3={"addressing_style": "path"} if endpoint else None,
        )
        session = boto3.session.Session()
        region = session.region_name or ("us-east-1" if endpoint else None)
        return session.client("s3", endpoint_url=endpoint, region_name=region, config=config)

    @property
    def retry_config(self) -> dict[str, Any]:
        """The retry settings the client runs with (``mode``, ``max_attempts``)."""
        return dict(self.client.meta.config.retries)

    def _missing(self, exc: Exception) -> bool:
        code = str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))
        return code in _MISSING_CODES

    def _wrap(self, uri: str, exc: Exception) -> Exception:
        if self._missing(exc):
            return FileNotFoundError(f"{uri}: no such object")
        status = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        return OSError(f"{uri}: {exc}" + (f" (HTTP {status})" if status else ""))

    def put_bytes(self, uri: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3_uri(uri)
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=data)
        except (ClientError, BotoCoreError) as exc:
            raise self._wrap(uri, exc) from exc

    def get_bytes(self, uri: str) -> bytes:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )

        bucket, key = split_s3_uri(uri)
        # botocore retries the request, not a body that breaks mid-read.
        for attempt in range(1, self.max_attempts + 1):
            try:
                body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
                with body:
                    return body.read()
            except (IncompleteReadError, ReadTimeoutError, ResponseStreamingError) as exc:
                if attempt == self.max_attempts:
                    raise OSError(f"{uri}: {exc}") from exc
                log.warning("%s: read failed (%s), retrying", uri, exc)
            except (ClientError, BotoCoreError) as exc:
                raise self._wrap(uri, exc) from exc
        raise AssertionError("unreachable")

    def put_file(self, uri: str, path: str | os.PathLike[str]) -> None:
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        if not os.path.isfile(path):
            raise FileNotFoundError(f"{os.fspath(path)}: no such local file to upload to {uri}")
        bucket, key = split_s3_uri(uri)
        config = TransferConfig(multipart_threshold=self.MULTIPART_THRESHOLD)
        try:
            # A multipart upload becomes visible only when it completes.
            self.client.upload_file(os.fspath(path), bucket, key, Config=config)
        except (ClientError, BotoCoreError) as exc:
            raise self._wrap(uri, exc) from exc
        except Exception as exc:  # s3transfer wraps failures in its own errors
            raise OSError(f"{uri}: upload of {os.fspath(path)} failed: {exc}") from exc

    def get_file(self, uri: str, path: str | os.PathLike[str]) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3_uri(uri)
        dest = os.path.abspath(path)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            # s3transfer downloads to a temporary name and renames when done.
            self.client.download_file(bucket, key, dest)
        except (ClientError, BotoCoreError) as exc:
            raise self._wrap(uri, exc) from exc

    def open_read(self, uri: str) -> BinaryIO:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3_uri(uri)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"]
        except (ClientError, BotoCoreError) as exc:
            raise self._wrap(uri, exc) from exc

    def list(self, prefix_uri: str) -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = split_s3_uri(prefix_uri)
        found = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for page in pages:
                found.extend(f"s3://{bucket}/{obj['Key']}" for obj in page.get("Contents", []))
        except (ClientError, BotoCoreError) as exc:
            raise self._wrap(prefix_uri, exc) from exc
        return sorted(found)

    def exists(self, uri: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3_uri(uri)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if self._missing(exc):
                return False
            raise OSError(f"{uri}: {exc}") from exc
        except BotoCoreError as exc:
            raise OSError(f"{uri}: {exc}") from exc
        return True

    def create_bytes(self, uri: str, data: bytes) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3_uri(uri)
        try:
            # A conditional write (S3 since 2024, SeaweedFS, MinIO): 412 when the key exists.
            self.client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return False
            raise self._wrap(uri, exc) from exc
        except BotoCoreError as exc:
            raise self._wrap(uri, exc) from exc
        return True

    def delete(self, uri: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3_uri(uri)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if not self._missing(exc):
                raise self._wrap(uri, exc) from exc
        except BotoCoreError as exc:
            raise self._wrap(uri, exc) from exc

    def sizes(self, prefix_uri: str) -> dict[str, int]:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, prefix = split_s3_uri(prefix_uri)
        found: dict[str, int] = {}
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for page in pages:
                found.update((f"s3://{bucket}/{obj['Key']}", int(obj["Size"])) for obj in page.get("Contents", []))
        except (ClientError, BotoCoreError) as exc:
            raise self._wrap(prefix_uri, exc) from exc
        return dict(sorted(found.items()))

    def presign_get(self, uri: str, expires_s: int = 3600) -> str:
        """A presigned (SigV4) HTTP GET URL for the object at ``uri``."""
        bucket, key = split_s3_uri(uri)
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s
        )


# ---------------------------------------------------------------------------
# helpers


_FILE_STORE = FileStore()
_S3_STORES: dict[tuple[str | None, ...], S3Store] = {}
# The environment that shapes an S3 client: a store is reused while it is unchanged.
_S3_ENV = (
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_MAX_ATTEMPTS",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


def open_store(uri: str) -> ArtifactStore:
    """The store for ``uri``'s scheme: ``s3://`` → S3, ``file://`` or a plain path → files."""
    if uri.startswith("s3://"):
        key = tuple(os.environ.get(name) for name in _S3_ENV)
        if key not in _S3_STORES:
            _S3_STORES[key] = S3Store()
        return _S3_STORES[key]
    if uri.startswith("file://") or "://" not in uri:
        return _FILE_STORE
    raise ValueError(f"{uri}: unsupported URI scheme (use s3:// or file://)")


def join_uri(base: str, *parts: str) -> str:
    """Join URI path segments with single slashes: ``join_uri("s3://b/run/", "gen-0", "x")``."""
    out = base
    for part in parts:
        if not part:
            continue
        out = out.rstrip("/") + "/" + part.lstrip("/")
    return out


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] + "/" if "/" in uri else ""


def _children(store: ArtifactStore, parent: str, cache: dict[str, set[str]]) -> set[str]:
    """Direct children of ``parent`` (one listing per parent)."""
    if parent not in cache:
        cache[parent] = {u for u in store.list(parent) if "/" not in u[len(parent) :]}
    return cache[parent]


def expand_shards(
    pattern: str | Iterable[str], store: ArtifactStore | None = None, check_exists: bool = True
) -> list[str]:
    """Expand shard URL patterns into the list of shard URIs.

    ``{000000..000003}`` and ``{a,b}`` are brace-expanded. A ``*``, ``?`` or
    ``[...]`` in the last path component is matched against the objects
    listed under its parent (for data whose shard count was not known in
    advance). With ``check_exists`` every shard must exist, otherwise
    ``FileNotFoundError`` names the first missing URI. Several patterns may be
    given as a list or separated by whitespace.
    """
    from braceexpand import braceexpand

    patterns = pattern.split() if isinstance(pattern, str) else list(pattern)
    # Plain relative paths are compared with listings, which are absolute.
    patterns = [p if "://" in p else os.path.abspath(p) for p in patterns]
    if not patterns:
        raise ValueError("empty shard pattern")
    store = store or open_store(patterns[0])
    listings: dict[str, set[str]] = {}
    result: list[str] = []
    for pat in patterns:
        for uri in braceexpand(pat):
            parent, name = _parent(uri), uri.rsplit("/", 1)[-1]
            if any(c in parent for c in _GLOB_CHARS):
                raise ValueError(f"{uri}: wildcards are only supported in the last path component")
            if any(c in name for c in _GLOB_CHARS):
                matches = sorted(
                    u for u in _children(store, parent, listings) if fnmatch.fnmatchcase(u[len(parent) :], name)
                )
                if not matches:
                    raise FileNotFoundError(f"{uri}: no shards match")
                result.extend(matches)
                continue
            if check_exists and uri not in _children(store, parent, listings):
                raise FileNotFoundError(f"{uri}: shard not found")
            result.append(uri)
    return list(dict.fromkeys(result))
