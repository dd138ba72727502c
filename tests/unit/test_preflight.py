"""Preflight checks of the local runner: unknown models, smaller students, missing shards."""

import pytest

from noisy_student_operator.api import parse_run
from noisy_student_operator.preflight import PreflightError, preflight


def run_with(tmp_path, teacher="resnet18", students=("resnet18",), **spec):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for split in ("labeled", "unlabeled", "validation"):
        (data / f"{split}-000000.tar").write_bytes(b"")
    document = {
        "apiVersion": "noisystudent.dev/v1alpha1", "kind": "NoisyStudentRun", "metadata": {"name": "p"},
        "spec": {
            "data": {"labeled": f"{data.as_uri()}/labeled-{{000000..000000}}.tar",
                     "unlabeled": f"{data.as_uri()}/unlabeled-000000.tar",
                     "validation": f"{data.as_uri()}/validation-*.tar", "numClasses": 10},
            "artifacts": {"uri": tmp_path.as_uri() + "/runs/"},
            "teacher": {"model": teacher},
            "students": [{"model": s} for s in students],
            **spec,
        },
    }
    return parse_run(document)


def test_valid_run_passes(tmp_path):
    preflight(run_with(tmp_path, "resnet18", ("resnet18", "resnet34")))


def test_unknown_model_names_the_field(tmp_path):
    with pytest.raises(PreflightError, match=r"spec\.students\[0\]\.model: unknown timm model 'resnet_18'"):
        preflight(run_with(tmp_path, "resnet18", ("resnet_18",)))


def test_smaller_student_is_refused_unless_allowed(tmp_path):
    with pytest.raises(PreflightError, match=r"spec\.students\[1\]\.model: resnet18 has .* fewer than"):
        preflight(run_with(tmp_path, "resnet18", ("resnet34", "resnet18")))
    preflight(run_with(tmp_path, "resnet34", ("resnet18",), training={"allowSmallerStudent": True}))


def test_missing_shards_name_the_split(tmp_path):
    run = run_with(tmp_path)
    (tmp_path / "data" / "unlabeled-000000.tar").unlink()
    with pytest.raises(PreflightError, match=r"spec\.data\.unlabeled: .*unlabeled-000000\.tar"):
        preflight(run)


def test_model_args_the_model_does_not_take_name_the_field(tmp_path):
    run = run_with(tmp_path, "test_resnet", ("test_resnet",))
    run.spec.students[0].model_args = {"stem_stride": 1}  # resnets have no such argument
    with pytest.raises(PreflightError, match=r"spec\.students\[0\]\.modelArgs: 'test_resnet' does not take .*stem_stride"):
        preflight(run)
    run.spec.students[0].model_args = {"output_stride": 8}
    preflight(run)
