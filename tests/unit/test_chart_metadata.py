"""Chart and image metadata that must agree with the Python package.

The chart version, its appVersion and the default image tags follow the
version in pyproject.toml; the images run as the same non-root UID/GID that
the chart's security context names; the operator image stays free of torch;
the images start from Debian's own slim image, which scripts/images makes.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "noisy-student-operator"
IMAGES = ROOT / "images"


def package_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def chart_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def crd_workloads_image() -> str:
    crd = yaml.safe_load((ROOT / "crds" / "noisystudent.dev_noisystudentruns.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec["properties"]["resources"]["properties"]["image"]["default"]


def test_chart_versions_follow_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["version"] == package_version()
    assert chart["appVersion"] == package_version()


def test_default_image_tag_is_the_app_version() -> None:
    """An empty tag renders as appVersion (the rendered image is checked with helm)."""
    values = chart_values()
    assert values["image"]["tag"] in ("", package_version())


def test_images_run_as_the_charts_user() -> None:
    values = chart_values()
    uid, gid = values["securityContext"]["runAsUser"], values["securityContext"]["runAsGroup"]
    assert (values["podSecurityContext"]["runAsUser"], values["podSecurityContext"]["runAsGroup"]) == (uid, gid)
    for dockerfile in ("operator.Dockerfile", "workloads.Dockerfile"):
        users = re.findall(r"^USER\s+(\S+)", (IMAGES / dockerfile).read_text(), flags=re.M)
        assert users and users[-1] == f"{uid}:{gid}", f"{dockerfile} must end as USER {uid}:{gid}"


def test_images_start_from_debians_own_slim_image() -> None:
    """A base that debootstrap reproduces (scripts/images base), with Debian's own Python."""
    for dockerfile in ("operator.Dockerfile", "workloads.Dockerfile"):
        text = (IMAGES / dockerfile).read_text()
        bases = re.findall(r"^ARG BASE_IMAGE=(\S+)", text, flags=re.M)
        assert bases, f"{dockerfile} declares no BASE_IMAGE"
        assert re.fullmatch(r"debian:[a-z]+-slim(@sha256:[0-9a-f]{64})?", bases[0]), bases[0]
        stages: list[str] = []
        for image, stage in re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, flags=re.M):
            assert image == "${BASE_IMAGE}" or image in stages, f"{dockerfile}: FROM {image}"
            stages.append(stage)
        assert len(stages) >= 2, f"{dockerfile} is not multi-stage"
        assert re.search(r"apt-get install .*\bpython3\b", text), f"{dockerfile} installs no Debian python3"


def requirements_extras(dockerfile: str) -> list[str]:
    """The extras whose requirements a Dockerfile installs (from pyproject.toml)."""
    return re.findall(r"pyproject\.toml (\w+) >/requirements\.txt", (IMAGES / dockerfile).read_text())


def test_operator_image_has_no_torch() -> None:
    assert requirements_extras("operator.Dockerfile") == ["operator"]
    assert requirements_extras("workloads.Dockerfile") == ["workloads"]
    assert "torch must not be in the operator image" in (IMAGES / "operator.Dockerfile").read_text()


def test_scripts_images_names_what_the_chart_and_crd_use() -> None:
    """`scripts/images tags`: the one place that names the images the tests build and run."""
    out = subprocess.run([ROOT / "scripts" / "images", "tags"], check=True, capture_output=True, text=True).stdout
    tags = dict(line.split(" ", 1) for line in out.splitlines())
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", (IMAGES / "operator.Dockerfile").read_text(), flags=re.M)[1]
    assert tags["base"] == f"docker.io/library/{base}"
    assert tags["operator"] == f"{chart_values()['image']['repository']}:{package_version()}"
    assert tags["workloads"] == crd_workloads_image()


def test_default_workloads_image_follows_the_package() -> None:
    """Runs default `spec.resources.image` to the workloads image of this version."""
    image = crd_workloads_image()
    assert image.endswith(f":{package_version()}"), image
