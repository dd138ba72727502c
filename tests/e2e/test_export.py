"""What a run gives its user, end to end on real local_cwd jobs: the exported model, predictions, early stop.

One tiny run (digits, 1-epoch test_resnet models, two students) with
`stopWhenGainBelow: 1.0` — no student gains a whole 100 % — stops after the
first student, skips the second, and exports the better of teacher and student.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from test_local_runner import run_cli, stage_dir, tiny_run, write

pytestmark = pytest.mark.e2e


def top1_of_folder(folder: Path, validation: str) -> float:
    """Top-1 on the validation shards with timm's own loader and eval transform (not the workloads')."""
    import timm
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from noisy_student_workloads.shards import load_shards

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    _, images, labels = load_shards(validation)
    batch = torch.stack([transform(Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).convert("RGB"))
                         for im in images])
    with torch.inference_mode():
        predicted = model(batch).argmax(dim=1).numpy()
    return float(np.mean(predicted == labels))


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("export")
    run_file = write(tmp_path, tiny_run("tiny", students=2, stopWhenGainBelow=1.0))
    artifacts = tmp_path / "artifacts"
    result = run_cli("run", str(run_file), "--artifacts", str(artifacts), "--output", "json")
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp_path, run_file, artifacts, json.loads(result.stdout), result.stderr


def test_the_run_stops_early_skips_the_rest_and_says_why(stopped_run):
    _, _, _, status, log = stopped_run
    assert status["stage"] == "Succeeded" and status["stoppedAfter"] == 1
    assert [g["generation"] for g in status["generations"]] == [0, 1]
    states = {(s["stage"], s["generation"]): s["state"] for s in status["stages"]}
    assert [states[(k, 2)] for k in ("label", "balance", "student")] == ["Skipped"] * 3
    assert states[("export", 2)] == "Complete"
    assert "StoppedEarly: The student of generation 1 gained" in log
    succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert succeeded["status"] == "True" and "stopWhenGainBelow (1)" in succeeded["message"]


def test_the_exported_folder_loads_with_timm_and_scores_what_the_workload_reported(stopped_run):
    _, _, artifacts, status, _ = stopped_run
    folder = Path(status["model"].removeprefix("file://"))
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 10
    assert config["pretrained_cfg"]["input_size"] == [3, 16, 16]
    assert len(config["pretrained_cfg"]["mean"]) == 3 and len(config["pretrained_cfg"]["std"]) == 3
    best = max(status["generations"], key=lambda g: (g["top1"], -g["generation"]))
    card = (folder / "README.md").read_text()
    assert "library_name: timm" in card and f"generation {best['generation']} of a Noisy Student run" in card
    for g in status["generations"]:
        assert g["key"] in card  # the stage key of every generation
    assert "## Recipe" in card and "stopped after generation 1" in card
    validation = str(stage_dir(artifacts / "default" / "tiny", "prepare") / "validation-*.tar")
    assert top1_of_folder(folder, validation) == pytest.approx(best["top1"], abs=1e-9)


def test_export_of_any_generation_and_predict_on_pngs(stopped_run):
    from noisy_student_workloads.shards import encode_png, load_shards

    tmp_path, run_file, artifacts, status, _ = stopped_run
    out = tmp_path / "teacher-model"
    result = run_cli("export", str(run_file), "--generation", "0", "--output", str(out), "--artifacts", str(artifacts))
    assert result.returncode == 0, result.stderr
    validation = str(stage_dir(artifacts / "default" / "tiny", "prepare") / "validation-*.tar")
    assert top1_of_folder(out, validation) == pytest.approx(status["generations"][0]["top1"], abs=1e-9)
    missing = run_cli("export", str(run_file), "--generation", "2", "--output", str(tmp_path / "x"),
                      "--artifacts", str(artifacts))
    assert missing.returncode == 2 and "--generation 2: not trained" in missing.stderr

    _, images, labels = load_shards(validation)
    pngs = []
    for i in range(3):
        pngs.append(tmp_path / f"digit-{i}.png")
        pngs[-1].write_bytes(encode_png(images[i]))
    result = run_cli("predict", str(out), *map(str, pngs), "--topk", "3", "-o", "json")
    assert result.returncode == 0, result.stderr
    predictions = json.loads(result.stdout)
    assert [p["image"] for p in predictions] == [str(p) for p in pngs]
    for p in predictions:
        probabilities = [t["probability"] for t in p["top"]]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert all(0 <= t["class"] < 10 for t in p["top"]) and sum(probabilities) <= 1 + 1e-6
    table = run_cli("predict", str(run_file), str(pngs[0]), "--artifacts", str(artifacts))
    assert table.returncode == 0, table.stderr
    assert "digit-0.png" in table.stdout and "probability" in table.stdout
    bad = run_cli("predict", str(out), str(tmp_path / "nope.png"))
    assert bad.returncode == 2 and "nope.png" in bad.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
