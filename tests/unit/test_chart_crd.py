"""The Helm chart carries a byte-for-byte copy of the generated CRD in crds/.

Helm cannot read files outside the chart directory, so
scripts/sync-chart-crd copies crds/ into the chart; this test fails when the
copy is stale. (tests/integration/test_helm_chart.py checks that the rendered
template equals it too, plus the keep annotation.)
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NAME = "noisystudent.dev_noisystudentruns.yaml"
GENERATED = ROOT / "crds" / NAME
CHART_COPY = ROOT / "charts" / "noisy-student-operator" / "files" / "crds" / NAME


def test_generated_crd_exists() -> None:
    assert GENERATED.is_file(), f"{GENERATED} is missing: generate it with `noisy-student crd`"


def test_chart_copy_equals_generated_crd() -> None:
    assert CHART_COPY.is_file(), f"{CHART_COPY} is missing: run scripts/sync-chart-crd"
    assert CHART_COPY.read_bytes() == GENERATED.read_bytes(), (
        "the chart's CRD differs from crds/: run scripts/sync-chart-crd"
    )
