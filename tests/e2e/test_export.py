"""What a run gives its user, end to end on real local_cwd jobs: the exported model, predictions, early stop,
live progress.

One tiny run (digits, test_resnet models, two students) with
`stopWhenGainBelow: 1.0` — no student gains a whole 100 % — stops after the
first student, skips the second, and exports the better of teacher and student.
Its status file is read while it runs: the teacher's progress advances.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from shard_data import read_shards
from test_local_runner import CLI, run_cli, stage_dir, tiny_run, write

pytestmark = pytest.mark.e2e


def top1_of_folder(folder: Path, validation: str) -> float:
    """Top-1 on the validation shards with timm's own loader and eval transform (not the workloads')."""
    import timm
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    _, images, labels = read_shards(validation)
    batch = torch.stack([transform(Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).convert("RGB"))
                         for im in images])
    with torch.inference_mode():
        predicted = model(batch).argmax(dim=1).numpy()
    return float(np.mean(predicted == labels))


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("export")
    document = tiny_run("tiny", students=2, stopWhenGainBelow=1.0)
    document["spec"]["teacher"]["epochs"] = 4  # long enough to be seen running: 4 epochs of 1,000 images
    document["spec"]["data"]["prepare"]["labelsPerClass"] = 100
    run_file = write(tmp_path, document)
    artifacts = tmp_path / "artifacts"
    status_file = artifacts / "default" / "tiny" / "status.json"
    process = subprocess.Popen([*CLI, "run", str(run_file), "--artifacts", str(artifacts), "--output", "json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []  # every distinct status.progress while the run runs
    deadline = time.monotonic() + 900
    while process.poll() is None and time.monotonic() < deadline:
        try:
            progress = json.loads(status_file.read_text()).get("progress")
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet
            progress = None
        if progress and (not seen or progress != seen[-1]):
            seen.append(progress)
        time.sleep(0.2)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-4000:]
    return tmp_path, run_file, artifacts, json.loads(stdout), stderr, seen


def test_status_progress_advances_while_the_teacher_trains(stopped_run):
    *_, status, _, seen = stopped_run
    teacher = [p for p in seen if p["stage"] == "teacher"]
    assert len(teacher) >= 2, seen
    epochs = [p["epoch"] for p in teacher]
    assert epochs == sorted(epochs) and epochs[-1] > epochs[0]
    assert all(p["epochs"] == 4 and 0 <= p["percent"] <= 100 for p in teacher)
    assert any(p.get("imagesPerSecond", 0) > 0 for p in teacher)
    assert any(p.get("eta") and p.get("etaSeconds") is not None for p in teacher)
    assert any(p.get("top1") is not None for p in teacher)  # after the first epoch's validation
    assert "progress" not in status  # the run has ended: nothing in progress


def test_the_run_stops_early_skips_the_rest_and_says_why(stopped_run):
    _, _, _, status, log, _ = stopped_run
    assert status["stage"] == "Succeeded" and status["stoppedAfter"] == 1
    assert [g["generation"] for g in status["generations"]] == [0, 1]
    states = {(s["stage"], s["generation"]): s["state"] for s in status["stages"]}
    assert [states[(k, 2)] for k in ("label", "balance", "student")] == ["Skipped"] * 3
    assert states[("export", 2)] == "Complete"
    assert "StoppedEarly: The student of generation 1 gained" in log
    succeeded = next(c for c in status["conditions"] if c["type"] == "Succeeded")
    assert succeeded["status"] == "True" and "stopWhenGainBelow (1)" in succeeded["message"]


def test_the_exported_folder_loads_with_timm_and_scores_what_the_workload_reported(stopped_run):
    _, _, artifacts, status, _, _ = stopped_run
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
    from noisy_student_workloads.shards import encode_png

    tmp_path, run_file, artifacts, status, _, _ = stopped_run
    out = tmp_path / "teacher-model"
    result = run_cli("export", str(run_file), "--generation", "0", "--output", str(out), "--artifacts", str(artifacts))
    assert result.returncode == 0, result.stderr
    validation = str(stage_dir(artifacts / "default" / "tiny", "prepare") / "validation-*.tar")
    assert top1_of_folder(out, validation) == pytest.approx(status["generations"][0]["top1"], abs=1e-9)
    missing = run_cli("export", str(run_file), "--generation", "2", "--output", str(tmp_path / "x"),
                      "--artifacts", str(artifacts))
    assert missing.returncode == 2 and "--generation 2: not trained" in missing.stderr

    _, images, labels = read_shards(validation)
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


def test_the_report_renders_in_a_headless_browser_with_every_section(stopped_run):
    import shutil

    from PIL import Image

    from noisy_student_workloads.report import SECTIONS

    tmp_path, run_file, artifacts, status, _, _ = stopped_run
    report = artifacts / "default" / "tiny" / "report.html"  # next to the run's own files
    page = report.read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    assert "<script" not in page.lower() and 'src="http' not in page  # self-contained
    assert page.count('src="data:image/png;base64,') == 4  # curves, g1's pseudo labels, confusion, g1's accuracy
    assert "pseudo labels are right" in page  # prepared data keeps the unlabeled images' classes aside
    export_dir = Path(status["model"].removeprefix("file://")).parent
    assert (export_dir / "report.html").read_text() == page

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(export_dir / "tensorboard" / "generation-0")).Reload()
    assert [s.step for s in events.Scalars("train/loss")] == [1, 2, 3, 4]  # the teacher's epochs
    assert len(EventAccumulator(str(export_dir / "tensorboard" / "run")).Reload().Scalars("generation/top1")) == 2

    rebuilt = run_cli("report", str(run_file), "--artifacts", str(artifacts), "--rebuild", "--no-open")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert rebuilt.stdout.strip() == report.as_uri() and "<h1>default/tiny</h1>" in report.read_text()

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (scripts/test installs it as root)")
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1200,3000", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=120, check=True)
    image = np.asarray(Image.open(shot).convert("L"))
    assert image.shape == (3000, 1200)
    ink = image < 128  # text, table rules, plots
    assert ink.mean() > 0.01 and ink[:1500].any(axis=1).sum() > 300  # rendered content, not a blank page
