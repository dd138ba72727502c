"""The run shown in docs/install.md is a valid NoisyStudentRun spec."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from noisy_student_operator.api import RunSpec

INSTALL_DOC = Path(__file__).resolve().parents[2] / "docs" / "install.md"


def test_first_run_example_is_valid() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", INSTALL_DOC.read_text(), flags=re.S)
    runs = [doc for block in blocks for doc in yaml.safe_load_all(block)
            if isinstance(doc, dict) and doc.get("kind") == "NoisyStudentRun"]
    assert runs, "docs/install.md shows no NoisyStudentRun"
    for run in runs:
        assert run["apiVersion"] == "noisystudent.dev/v1alpha1"
        RunSpec.model_validate(run["spec"])
