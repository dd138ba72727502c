"""The project's images, built by scripts/images with podman and run as the chart's pods run them.

No registry is reachable: `scripts/images build` makes Debian's bookworm-slim
with debootstrap and builds images/*.Dockerfile unchanged on it. Needs podman
as root: skipped without it, a failure under CI=true (scripts/test builds the
images before pytest, so the build here is skipped: same inputs).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from conftest import skip_or_fail
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "images"

# A cold build downloads and unpacks gigabytes of CUDA wheels.
pytestmark = [pytest.mark.containers, pytest.mark.timeout(3600)]


def images(*args: str, timeout: float = 3600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=timeout)


def podman(*args: str) -> str:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"podman {' '.join(args[:8])}: {done.stderr}"
    return done.stdout


def run(image: str, *args: str, entrypoint: str | None = None) -> str:
    """Run a container as scripts/images does (runc, explicit limits) and return its output."""
    flags = ["--runtime", "runc", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]
    return podman("run", "--rm", *flags, *(["--entrypoint", entrypoint] if entrypoint else []), image, *args)


def image_id(name: str) -> str:
    return podman("image", "inspect", "--format", "{{.Id}}", name).strip()


@pytest.fixture(scope="module")
def tags() -> dict[str, str]:
    """Role → image name, after `scripts/images build`."""
    if shutil.which("podman") is None or os.geteuid() != 0:
        skip_or_fail("podman as root is needed to build and run the images (scripts/images)")
    build = images("build")
    assert build.returncode == 0, build.stderr[-4000:]
    return dict(line.split(" ", 1) for line in images("tags").stdout.splitlines())


def test_an_unchanged_rebuild_is_a_no_op(tags: dict[str, str]) -> None:
    before = {role: image_id(tags[role]) for role in ("operator", "workloads")}
    rebuild = images("build")
    assert rebuild.returncode == 0, rebuild.stderr[-4000:]
    assert {role: image_id(tags[role]) for role in before} == before


def test_images_hold_the_sources_of_this_checkout(tags: dict[str, str]) -> None:
    """A cached rebuild must not keep an earlier wheel of the project."""
    digests = (
        "import hashlib, pathlib, sys\n"
        "for package in sys.argv[1:]:\n"
        "    root = pathlib.Path(__import__(package).__file__).parent\n"
        "    for path in sorted(root.rglob('*.py')):\n"
        "        print(package, path.relative_to(root), hashlib.sha256(path.read_bytes()).hexdigest())\n"
    )
    sources = {"noisy_student_operator": ROOT / "operator", "noisy_student_workloads": ROOT / "workloads"}
    expected = "".join(
        f"{package} {path.relative_to(root / package)} {hashlib.sha256(path.read_bytes()).hexdigest()}\n"
        for package, root in sources.items()
        for path in sorted((root / package).rglob("*.py"))
    )
    for role in ("operator", "workloads"):
        out = run(tags[role], "-c", digests, *sources, entrypoint="python")
        assert out == expected, f"the {role} image does not hold this checkout's sources"


def test_images_run_debians_own_python_that_the_package_accepts(tags: dict[str, str]) -> None:
    os_release = run(tags["base"], "cat", "/etc/os-release")
    assert "VERSION_CODENAME=bookworm" in os_release
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    for role in ("operator", "workloads"):
        out = run(tags[role], "-c", "readlink -f /opt/venv/bin/python && dpkg-query -W -f '${Version}' python3",
                  entrypoint="bash")
        interpreter, debian_version = out.split()
        assert re.fullmatch(r"/usr/bin/python3\.\d+", interpreter), interpreter
        version = re.match(r"\d+\.\d+\.\d+", debian_version)[0]  # e.g. 3.11.2-1+b1
        assert version in SpecifierSet(requires), f"{role}: Debian's Python {version}, the package needs {requires}"


def test_the_build_ca_is_in_no_image(tags: dict[str, str]) -> None:
    """The proxy's CA reaches pip as a build secret only: no trust store and no variable of an image holds it."""
    host_bundle = Path(os.environ.get("PIP_CERT", "/etc/ssl/certs/ca-certificates.crt"))
    for role in ("operator", "workloads"):
        env = podman("image", "inspect", "--format", "{{.Config.Env}}", tags[role])
        assert "PIP_CERT" not in env and "pip-ca" not in env
        # Debian's own CA files, then every bundle that Python code in the image trusts.
        out = run(tags[role], "-c",
                  "test ! -e /run/secrets/pip-ca && cat /usr/share/ca-certificates/mozilla/*.crt && echo TRUSTED && "
                  "cat /etc/ssl/certs/ca-certificates.crt /opt/venv/lib/python3*/site-packages/certifi/cacert.pem",
                  entrypoint="bash")
        debian, trusted = (set(pem_blocks(part)) for part in out.split("TRUSTED"))
        if host_bundle.is_file():  # the machine's own additions (e.g. a proxy's CA) are not Debian's
            added = [cert for cert in pem_blocks(host_bundle.read_text()) if cert not in debian]
            assert not [cert for cert in added if cert in trusted], f"{role}: a CA of the build machine is in the image"


def pem_blocks(text: str) -> list[str]:
    return ["".join(block.split()) for block in re.findall(r"-----BEGIN CERTIFICATE-----(.*?)-----END", text, re.S)]


def test_the_operator_image_runs_as_a_pod(tags: dict[str, str]) -> None:
    """Entry point, version and imports (kopf, TorchX, never torch) as uid 10001 on a read-only root."""
    smoke = images("smoke", "operator", timeout=600)
    assert smoke.returncode == 0, smoke.stderr[-4000:]


def test_the_workloads_image_trains_a_teacher_as_a_pod(tags: dict[str, str]) -> None:
    """torch, torchvision and timm import; a one-epoch teacher on digits completes on a file:// store."""
    smoke = images("smoke", "workloads", timeout=1200)
    assert smoke.returncode == 0, smoke.stderr[-4000:]
