"""Train / label config validation: errors name the field; models and student size are checked."""

import json

import pytest

from noisy_student_workloads.config import ConfigError, LabelConfig, TrainConfig, parse_config


def teacher_config(**overrides) -> dict:
    cfg = {
        "role": "teacher", "model": "test_resnet", "num_classes": 10, "image_size": 16,
        "labeled": "file:///d/labeled-{000000..000001}.tar", "validation": "file:///d/validation-000000.tar",
        "pseudo": None, "noise": {"rand_augment": None, "dropout": 0.0, "stochastic_depth": 0.0},
        "epochs": 2, "batch_size": 8, "lr": 0.1, "weight_decay": 5e-5, "optimizer": "sgd", "warmup_epochs": 0,
        "seed": 0, "teacher": None, "allow_smaller_student": False, "workers": 0, "output": "file:///r/teacher/",
    }
    cfg.update(overrides)
    return cfg


def student_config(**overrides) -> dict:
    return teacher_config(
        role="student",
        pseudo={"manifest": "file:///r/balance/manifest.json", "unlabeled": "file:///d/unlabeled-000000.tar",
                "type": "soft", "temperature": 1.0, "ratio": 3},
        noise={"rand_augment": {"ops": 2, "magnitude": 9}, "dropout": 0.5, "stochastic_depth": 0.2},
        **overrides,
    )


def test_full_contract_parses_from_json_string():
    cfg = parse_config(json.dumps(student_config()), TrainConfig)
    assert cfg.pseudo.ratio == 3 and cfg.noise.rand_augment.magnitude == 9
    assert parse_config(teacher_config(), TrainConfig).role == "teacher"


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"role": "critic"}, "role"),
        ({"num_classes": 1}, "num_classes"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": "big"}, "batch_size"),
        ({"lr": -1}, "lr"),
        ({"noise": {"dropout": 1.5}}, "noise.dropout"),
        ({"noise": {"rand_augment": {"ops": 0}}}, "noise.rand_augment.ops"),
        ({"warmup_epochs": 5}, "warmup_epochs"),
        ({"learning_rate": 0.1}, "learning_rate"),
        ({"pseudo": {"manifest": "m", "unlabeled": "u"}}, "pseudo"),
        ({"corruptions": {"fog": [0.5]}}, "corruptions"),
        ({"corruptions": {"contrast": []}}, "corruptions"),
    ],
)
def test_validation_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=rf"\b{field}\b"):
        parse_config(teacher_config(**overrides), TrainConfig)


def test_missing_key_and_bad_pseudo_fields_are_named():
    cfg = teacher_config()
    del cfg["output"]
    with pytest.raises(ConfigError, match="output: Field required"):
        parse_config(cfg, TrainConfig)
    bad = student_config()
    bad["pseudo"]["type"] = "fuzzy"
    with pytest.raises(ConfigError, match="pseudo.type"):
        parse_config(bad, TrainConfig)
    with pytest.raises(ConfigError, match="pseudo"):
        parse_config(teacher_config(role="student"), TrainConfig)


def test_config_from_uri_and_bad_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(teacher_config()))
    assert parse_config(f"file://{path}", TrainConfig).model == "test_resnet"
    with pytest.raises(ConfigError, match="--config"):
        parse_config("{not json", TrainConfig)
    with pytest.raises(ConfigError, match="--config"):
        parse_config(f"file://{tmp_path}/missing.json", TrainConfig)


def test_label_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="replicas: unknown key"):
        parse_config({"checkpoint": "c", "unlabeled": "u", "output": "o", "replicas": 2}, LabelConfig)


def test_unknown_model_names_field_and_close_matches():
    from noisy_student_workloads.train import build_model

    cfg = parse_config(teacher_config(model="resnet19"), TrainConfig)
    with pytest.raises(ConfigError, match=r"model: unknown timm model 'resnet19'.*resnet18"):
        build_model(cfg)


def test_unknown_optimizer_is_named():
    from noisy_student_workloads.train import check_optimizer

    with pytest.raises(ConfigError, match="optimizer"):
        check_optimizer("sgdd")
    check_optimizer("adamw")


def test_student_smaller_than_teacher_is_refused_unless_allowed():
    from noisy_student_workloads.train import build_model

    big = {"model": "resnet18", "parameters": 11_000_000}
    cfg = parse_config(student_config(teacher=big), TrainConfig)
    with pytest.raises(ConfigError, match=r"model: student 'test_resnet' has .* fewer than its teacher 'resnet18'"):
        build_model(cfg)
    allowed = parse_config(student_config(teacher=big, allow_smaller_student=True), TrainConfig)
    model, parameters = build_model(allowed)
    assert 0 < parameters < big["parameters"]
    same = parse_config(student_config(teacher={"model": "test_resnet", "parameters": parameters}), TrainConfig)
    assert build_model(same)[1] == parameters


def test_model_noise_reaches_timm():
    from noisy_student_workloads.train import build_model

    model, _ = build_model(parse_config(student_config(model="resnet10t"), TrainConfig))
    assert model.drop_rate == 0.5
    drop_paths = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert drop_paths and max(drop_paths) == pytest.approx(0.2)


def test_new_train_keys_have_defaults_so_older_configs_still_parse():
    cfg = parse_config(teacher_config(), TrainConfig)
    assert (cfg.eval_images, cfg.keep_checkpoints, cfg.shuffle_buffer, cfg.compile) == (500, 2, 1000, False)
    with pytest.raises(ConfigError, match="keep_checkpoints"):
        parse_config(teacher_config(keep_checkpoints=0), TrainConfig)


def test_the_manifest_index_is_checked_against_the_config_and_the_shards(tmp_path):
    import numpy as np

    from noisy_student_workloads.manifest import ManifestWriter
    from noisy_student_workloads.shards import ShardWriter, encode_png
    from noisy_student_workloads.store import FileStore
    from noisy_student_workloads.train import open_manifest

    with ShardWriter(FileStore(), f"file://{tmp_path}/unlabeled-%06d.tar", 4) as w:
        for i in range(10):
            w.write(f"u-{i:02d}", encode_png(np.zeros((4, 4), np.uint8)))
    kept = np.asarray([1, 2, 5, 8, 9])  # kept by balancing, in label (tar) order
    writer = ManifestWriter(f"file://{tmp_path}/balance/", [u.rsplit("/", 1)[-1] for u in w.uris],
                            np.asarray([4, 4, 2]), 10)
    writer.add(np.arange(10) // 4, kept, {"keys": np.asarray([f"u-{i:02d}".encode() for i in kept]),
                                          "copies": np.asarray([1, 2, 1, 3, 1], np.int32),
                                          "classes": np.zeros(5, np.int32), "probs": np.full((5, 10), 0.1, np.float16)})
    writer.close()
    raw = student_config()
    raw["pseudo"] = {**raw["pseudo"], "manifest": f"file://{tmp_path}/balance/manifest.json",
                     "unlabeled": f"file://{tmp_path}/unlabeled-{{000000..000002}}.tar"}
    cfg = parse_config(raw, TrainConfig)
    copies = open_manifest(cfg.pseudo, cfg)
    assert copies.sizes(w.uris, None) == [3, 1, 4]
    block = copies.manifest.block("unlabeled-000002.tar")
    assert block["keys"].tolist() == [b"u-08", b"u-09"] and block["copies"].tolist() == [3, 1]
    with pytest.raises(ConfigError, match="num_classes: 5 but the pseudo-label manifest has 10 classes"):
        open_manifest(cfg.pseudo, parse_config({**raw, "num_classes": 5}, TrainConfig))
    fewer = parse_config({**raw, "pseudo": {**raw["pseudo"], "unlabeled": f"file://{tmp_path}/unlabeled-000000.tar"}},
                         TrainConfig)
    with pytest.raises(ConfigError, match=r"pseudo.unlabeled: the manifest's shard 'unlabeled-000001.tar' is not in"):
        open_manifest(fewer.pseudo, fewer)
    (tmp_path / "balance" / "manifest" / "unlabeled-000002.tar.npz").write_bytes(b"changed")
    with pytest.raises(ConfigError, match=r"pseudo.manifest: .*unlabeled-000002.tar.npz does not match the sha256"):
        copies.manifest.block("unlabeled-000002.tar")
    old = parse_config({**raw, "pseudo": {**raw["pseudo"], "manifest": f"file://{tmp_path}/balance/manifest.npz"}},
                       TrainConfig)
    with pytest.raises(ConfigError, match="an older balance stage"):
        open_manifest(old.pseudo, old)
