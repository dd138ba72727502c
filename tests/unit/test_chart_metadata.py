"""Chart and image metadata that must agree with the Python package.

The chart version, its appVersion and the default image tags follow the
version in pyproject.toml; the images run as the same non-root UID/GID that
the chart's security context names; the operator image stays free of torch.
"""

from __future__ import annotations

import re
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


def test_base_images_are_pinned_by_version() -> None:
    for dockerfile in ("operator.Dockerfile", "workloads.Dockerfile"):
        text = (IMAGES / dockerfile).read_text()
        bases = re.findall(r"^ARG PYTHON_IMAGE=(\S+)", text, flags=re.M)
        assert bases, f"{dockerfile} declares no PYTHON_IMAGE"
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", bases[0]), bases[0]
        froms = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
        assert len(froms) >= 2, f"{dockerfile} is not multi-stage"
        assert all(f.startswith("${PYTHON_IMAGE}") for f in froms), froms


def test_operator_image_has_no_torch() -> None:
    text = (IMAGES / "operator.Dockerfile").read_text()
    installs = re.findall(r'pip install\s+"\.\[(\w+)\]"', text)
    assert installs == ["operator"]
    workloads = (IMAGES / "workloads.Dockerfile").read_text()
    assert '".[workloads]"' in workloads


def test_default_workloads_image_follows_the_package() -> None:
    """Runs default `spec.resources.image` to the workloads image of this version."""
    crd = yaml.safe_load((ROOT / "crds" / "noisystudent.dev_noisystudentruns.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    image = spec["properties"]["resources"]["properties"]["image"]["default"]
    assert image.endswith(f":{package_version()}"), image
