"""The official Noisy Student recipe in the train workload: loss weighting, label smoothing, weight EMA,
RandAugment range and fill, timm constructor arguments (google-research/noisystudent main.py)."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from noisy_student_operator.api import load_run_file
from noisy_student_workloads.config import ConfigError, RandAugmentConfig, TrainConfig, parse_config
from noisy_student_workloads.images import rand_augment
from noisy_student_workloads.models import create_model, load_final, save_final, start_from
from noisy_student_workloads.train import (
    FILLS, LabeledTargets, data_loss, manifest_targets, smoothed, soft_cross_entropy, weight_ema,
)

ROOT = Path(__file__).resolve().parents[2]


def test_the_pseudo_labeled_loss_weighs_as_many_images_as_it_has():
    torch.manual_seed(0)
    logits, targets = torch.randn(8, 4), F.softmax(torch.randn(8, 4), dim=1)
    labeled, pseudo = soft_cross_entropy(logits[:2], targets[:2]), soft_cross_entropy(logits[2:], targets[2:])
    # official: (lab_loss * lab_bsz + unl_loss * unl_bsz) / lab_bsz, here B = 2 and U = 6
    assert data_loss(logits, targets, 2) == pytest.approx(float(labeled * 2 + pseudo * 6) / 2)
    assert data_loss(logits, targets, 2, "equal") == pytest.approx(float(labeled + pseudo))
    assert data_loss(logits[:2], targets[:2], 2) == pytest.approx(float(labeled))  # a teacher: labeled only


def test_label_smoothing_as_tensorflow_for_labels_and_hard_pseudo_labels_not_soft_ones():
    one_hot = torch.eye(4)[[2]]
    assert smoothed(one_hot, 0.1)[0].tolist() == pytest.approx([0.025, 0.025, 0.925, 0.025])
    targets = LabeledTargets(4, "labeled", 0.1)([{"label": 2, "__url__": "u", "__key__": "k"}])
    assert targets[0].tolist() == pytest.approx([0.025, 0.025, 0.925, 0.025])
    manifest = {"classes": np.array([1]), "probs": np.array([[0.1, 0.7, 0.1, 0.1]], dtype=np.float16)}
    hard = manifest_targets(manifest, 4, "hard", 1.0, 0.1)
    assert hard[0].tolist() == pytest.approx([0.025, 0.925, 0.025, 0.025])
    soft = manifest_targets(manifest, 4, "soft", 1.0, 0.1)
    assert soft[0].tolist() == pytest.approx([0.1, 0.7, 0.1, 0.1], abs=1e-3)


def test_weight_ema_warms_up_and_averages_batchnorm_statistics_too():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    ema = weight_ema(model, 0.9999)
    assert [ema.get_decay(n) for n in (1, 10, 1000)] == pytest.approx([2 / 11, 11 / 20, 1001 / 1010])
    assert weight_ema(model, 0.5).get_decay(1000) == 0.5  # the configured decay once warm
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for n in range(1, 6):
        model.train()
        model(torch.randn(16, 3))  # moves the BatchNorm running statistics
        with torch.no_grad():
            model[0].weight.add_(1.0)
        ema.update(model, step=n)
        decay = min(0.9999, (1 + n) / (10 + n))
        for k, v in model.state_dict().items():
            expected[k] = decay * expected[k] + (1 - decay) * v if v.is_floating_point() else v.clone()
    got = ema.module.state_dict()
    for k in ("0.weight", "1.running_mean", "1.running_var"):
        assert torch.allclose(got[k], expected[k], atol=1e-6), k
        assert not torch.allclose(got[k], model.state_dict()[k]), k  # an average, not a copy
    assert int(got["1.num_batches_tracked"]) == 5


def test_the_final_checkpoint_keeps_the_ema_under_its_own_key_and_labeling_uses_it(tmp_path):
    uri = (tmp_path / "checkpoint.pt").as_uri()
    model = create_model("test_resnet", 10, model_args={"output_stride": 8})
    average = create_model("test_resnet", 10, model_args={"output_stride": 8})
    with torch.no_grad():
        for p in average.parameters():
            p.fill_(0.01)
    save_final(uri, model, "test_resnet", 10, 28, {"output_stride": 8}, average)
    payload = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert set(payload) >= {"state_dict", "ema", "model_args"} and payload["model_args"] == {"output_stride": 8}
    loaded, meta = load_final(uri)
    assert meta["weights"] == "ema" and meta["model_args"] == {"output_stride": 8}
    assert all(bool((p == 0.01).all()) for p in loaded.parameters())
    # a checkpoint from before EMA and model arguments still loads, with its only weights
    del payload["ema"], payload["model_args"]
    old = create_model("test_resnet", 10)
    payload["state_dict"] = old.state_dict()
    torch.save(payload, tmp_path / "old.pt")
    loaded, meta = load_final((tmp_path / "old.pt").as_uri())
    assert meta["weights"] == "state_dict"
    assert torch.equal(next(loaded.parameters()), next(old.parameters()))


def test_a_student_started_from_its_teacher_gets_the_teachers_average_and_only_from_its_own_kind(tmp_path):
    uri = (tmp_path / "teacher.pt").as_uri()
    args = {"output_stride": 8}
    teacher, average = create_model("test_resnet", 10, model_args=args), create_model("test_resnet", 10, model_args=args)
    with torch.no_grad():
        for p in average.parameters():
            p.fill_(0.01)
    save_final(uri, teacher, "test_resnet", 10, 28, args, average)
    student = create_model("test_resnet", 10, 0.3, 0.2, args)  # the noise adds no weights
    start_from(uri, student, "test_resnet", 10, args)
    assert all(bool((p == 0.01).all()) for p in student.parameters())  # the average, not the raw weights
    for name, classes, other in (("test_resnet", 10, {}), ("resnet10t", 10, args), ("test_resnet", 5, args)):
        with pytest.raises(ConfigError, match=r"^init: .*teacher.pt holds 'test_resnet'.*its own kind"):
            start_from(uri, create_model(name, classes, model_args=other), name, classes, other)
    with pytest.raises(ConfigError, match=r"^init: .*missing\.pt"):
        start_from((tmp_path / "missing.pt").as_uri(), student, "test_resnet", 10, args)


def feature_sizes(model: torch.nn.Module, size: int) -> list[int]:
    model.eval()
    return [f.shape[-1] for f in model.forward_intermediates(torch.zeros(1, 3, size, size), intermediates_only=True)]


def test_the_fashion_mnist_models_keep_every_stage_above_one_pixel():
    assert feature_sizes(create_model("test_resnet", 10), 28) == [14, 7, 4, 2, 1]  # what the args fix
    spec = load_run_file(ROOT / "examples" / "fashion-mnist.yaml").spec
    for generation in range(len(spec.students) + 1):
        entry = spec.model_spec_for(generation)
        sizes = feature_sizes(create_model(entry.model, 10, model_args=entry.model_args), spec.data.image_size)
        assert min(sizes) >= 4, (generation, sizes)


def test_model_args_the_model_does_not_take_fail_naming_the_field():
    with pytest.raises(ConfigError, match=r"model_args: 'test_resnet' does not take .*stem_stride"):
        create_model("test_resnet", 10, model_args={"stem_stride": 1})
    base = {"role": "teacher", "model": "test_resnet", "num_classes": 10, "labeled": "l", "validation": "v",
            "epochs": 1, "output": "o"}
    for args, message in (({"num_classes": 3}, "set by the workload"), ({"a-b": 1}, "not a keyword argument"),
                          ({"x": {"y": 1}}, "model_args.x")):
        with pytest.raises(ConfigError, match=message):
            parse_config({**base, "model_args": args}, TrainConfig)


def test_rand_augment_magnitudes_above_ten_are_not_clipped_and_the_fill_is_configurable():
    transform = rand_augment(2, 15, 28, FILLS["black"])
    assert all(op.magnitude_max == 30 and op.magnitude == 15 for op in transform.ops)
    with pytest.raises(ConfigError, match="magnitude: 15 is above magnitude_max"):
        parse_config({"ops": 2, "magnitude": 15, "magnitude_max": 10}, RandAugmentConfig)
    rotate = next(op for op in rand_augment(1, 10, 28, FILLS["black"]).ops if op.name == "Rotate")
    rotate.prob, rotate.magnitude_std = 1.0, 0.0
    corner = np.asarray(rotate(Image.new("RGB", (28, 28), (255, 255, 255))))[0, 0]
    assert corner.tolist() == [0, 0, 0]  # a black background stays black where the rotation uncovers it

