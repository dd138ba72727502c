"""Run files: parsing, defaults, and errors that name the field."""

from pathlib import Path

import pytest

from noisy_student_operator.api import RunFileError, load_run_file, parse_run

ROOT = Path(__file__).resolve().parents[2]


def minimal(**spec_overrides):
    spec = {
        "data": {"labeled": "file:///d/l-{0..1}.tar", "unlabeled": "file:///d/u-0.tar",
                 "validation": "file:///d/v-0.tar", "numClasses": 10},
        "artifacts": {"uri": "file:///tmp/runs/"},
        "teacher": {"model": "resnet18"},
        "students": [{"model": "resnet18"}],
    }
    spec.update(spec_overrides)
    return {"apiVersion": "noisystudent.dev/v1alpha1", "kind": "NoisyStudentRun",
            "metadata": {"name": "demo"}, "spec": spec}


def test_examples_parse():
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        run = load_run_file(path)
        assert run.spec.students, path


def test_defaults_fill_in():
    run = parse_run(minimal())
    assert run.spec.pseudo_labels.confidence_threshold == 0.3
    assert run.spec.noise.rand_augment.ops == 2
    # the official recipe (google-research/noisystudent main.py) unless a run file says otherwise
    assert run.spec.noise.rand_augment.magnitude_max == 30 and run.spec.noise.rand_augment.fill == "mean"
    training = run.spec.training
    assert (training.label_smoothing, training.ema_decay, training.unlabeled_loss_weight) == (0.1, 0.9999, "ratio")
    assert run.spec.teacher.model_args == {}
    assert run.spec.resources.nodes.min == 1
    assert run.metadata.namespace == "default"


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"pseudoLabels": {"confidenceThreshold": 1.5}}, "spec.pseudoLabels.confidenceThreshold"),
        ({"pseudoLabels": {"imagesPerClass": 0}}, "spec.pseudoLabels"),
        ({"students": []}, "spec.students"),
        ({"training": {"batchSize": 0}}, "spec.training.batchSize"),
        ({"resources": {"nodes": {"min": 3, "max": 2}}}, "spec.resources.nodes"),
        ({"teacher": {"model": "ResNet 18"}}, "spec.teacher.model"),
        ({"artifacts": {"uri": "http://x"}}, "spec.artifacts.uri"),
        ({"data": {"numClasses": 10}}, "spec.data"),
        ({"trainig": {}}, "spec.trainig"),
        # RandAugment values the workloads cannot honour
        ({"noise": {"randAugment": {"ops": 0}}}, "spec.noise.randAugment.ops"),
        ({"noise": {"randAugment": {"magnitude": 15, "magnitudeMax": 10}}}, "spec.noise.randAugment"),
        ({"noise": {"randAugment": {"fill": "purple"}}}, "spec.noise.randAugment.fill"),
        ({"training": {"emaDecay": 1.0}}, "spec.training.emaDecay"),
        ({"training": {"labelSmoothing": -0.1}}, "spec.training.labelSmoothing"),
        ({"training": {"unlabeledLossWeight": "half"}}, "spec.training.unlabeledLossWeight"),
        # modelArgs: keyword names, not set by the workload, JSON scalars or lists
        ({"teacher": {"model": "resnet18", "modelArgs": {"output-stride": 8}}}, "spec.teacher"),
        ({"teacher": {"model": "resnet18", "modelArgs": {"num_classes": 3}}}, "spec.teacher"),
        ({"students": [{"model": "resnet18", "modelArgs": {"x": {"nested": 1}}}]}, "spec.students[0].modelArgs.x"),
        # a student starts from its teacher's weights only when it is the teacher's model with its arguments
        ({"students": [{"model": "resnet34", "init": "teacher"}]}, "students[0].init: 'teacher' needs"),
        ({"students": [{"model": "resnet18", "init": "teacher", "modelArgs": {"output_stride": 8}}]},
         "students[0].init: 'teacher' needs"),
        ({"students": [{"model": "resnet18", "init": "pretrained"}]}, "spec.students[0].init"),
        ({"resources": {"image": "x" * 513}}, "spec.resources.image"),
        ({"resources": {"memoryMiB": 2**23}}, "spec.resources.memoryMiB"),
        ({"resources": {"balance": {"gpu": 1}}}, "spec.resources.balance.gpu"),
        ({"resources": {"train": {"nodes": {"min": 2, "max": 1}}}}, "spec.resources.train.nodes"),
        ({"scheduler": {"queue": "q" * 254}}, "spec.scheduler.queue"),
        ({"placement": {"labels": {"bad key": "x"}}}, "spec.placement.labels"),
        ({"placement": {"label": {"nodeSelector": {"pool": "not valid!"}}}}, "spec.placement.label.nodeSelector"),
        ({"placement": {"tolerations": [{"effect": "Sometimes"}]}}, "spec.placement.tolerations[0].effect"),
    ],
)
def test_invalid_specs_name_the_field(overrides, field):
    with pytest.raises(RunFileError) as error:
        parse_run(minimal(**overrides), "run.yaml")
    assert field in str(error.value)
    assert "run.yaml" in str(error.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(RunFileError, match="nope.yaml: no such file"):
        load_run_file(tmp_path / "nope.yaml")
