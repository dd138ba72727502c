"""The local runner end to end: real TorchX local_cwd jobs, real timm models, real images.

A tiny run (scikit-learn digits, 1-epoch models) goes through every stage,
including data preparation; an interrupted run resumes without redoing
completed stages; a failing stage ends with a non-zero exit and its log.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.e2e

CLI = [sys.executable, "-m", "noisy_student_operator.cli"]


def tiny_run(name: str, students: int = 1, epochs: int = 1, **overrides) -> dict:
    spec = {
        "data": {"numClasses": 10, "imageSize": 16,
                 "prepare": {"source": "digits", "labelsPerClass": 10, "validationSize": 300,
                             "shardSize": 400}},
        "artifacts": {"uri": "file:///unused/"},
        "teacher": {"model": "test_resnet", "epochs": epochs},
        "students": [{"model": "test_resnet", "epochs": epochs}] * students,
        "training": {"batchSize": 16, "unlabeledRatio": 2, "epochs": epochs},
        "resources": {"labelShards": 2, "workers": 0},
        "retry": {"limit": 0},
        "scheduler": {"name": "local_cwd"},
    }
    spec.update(overrides)
    return {"apiVersion": "noisystudent.dev/v1alpha1", "kind": "NoisyStudentRun",
            "metadata": {"name": name}, "spec": spec}


def write(tmp_path: Path, document: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def run_cli(*args, timeout=900):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_whole_run_with_prepare_label_balance_and_students(tmp_path):
    run_file = write(tmp_path, tiny_run("tiny", students=2))
    artifacts = tmp_path / "artifacts"
    result = run_cli("run", str(run_file), "--artifacts", str(artifacts), "--output", "json")
    assert result.returncode == 0, result.stderr[-4000:]
    status = json.loads(result.stdout)
    assert status["stage"] == "Succeeded"
    assert [g["generation"] for g in status["generations"]] == [0, 1, 2]
    for generation in status["generations"]:
        assert 0.0 <= generation["top1"] <= 1.0
        assert generation["parameters"] > 0
    prefix = artifacts / "default" / "tiny"
    for path in ("data/_DONE.json", "gen-0/teacher/_DONE.json", "gen-1/labels/_DONE.json",
                 "gen-1/balance/_DONE.json", "gen-2/student/checkpoint.pt", "top1.png", "status.json"):
        assert (prefix / path).exists(), path
    names = [j["name"] for j in status["jobs"]]
    assert len(names) == len(set(names)) == 1 + 1 + 3 * 2

    again = run_cli("status", str(run_file), "--artifacts", str(artifacts), "--output", "json")
    assert json.loads(again.stdout)["generations"] == status["generations"]


def test_interrupted_run_resumes_without_redoing_stages(tmp_path):
    run_file = write(tmp_path, tiny_run("resume", students=1, epochs=2))
    artifacts = tmp_path / "artifacts"
    prefix = artifacts / "default" / "resume"
    process = subprocess.Popen([*CLI, "run", str(run_file), "--artifacts", str(artifacts)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not (prefix / "gen-0/teacher/_DONE.json").exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    assert process.returncode != 0
    teacher_marker = (prefix / "gen-0/teacher/_DONE.json").stat().st_mtime

    result = run_cli("run", str(run_file), "--artifacts", str(artifacts), "--output", "json")
    assert result.returncode == 0, result.stderr[-4000:]
    status = json.loads(result.stdout)
    assert status["stage"] == "Succeeded"
    assert (prefix / "gen-0/teacher/_DONE.json").stat().st_mtime == teacher_marker
    teacher_jobs = [j for j in status["jobs"] if j["stage"] in ("teacher", "prepare")]
    assert [j["name"] for j in teacher_jobs] == ["resume-g0-prepare", "resume-g0-teacher"]


def test_failing_stage_exits_non_zero_with_stage_and_log(tmp_path):
    document = tiny_run("broken", students=1)
    missing = tmp_path / "no-such-images"
    document["spec"]["data"]["prepare"] = {"source": "folder", "path": str(missing), "labelsPerClass": 1}
    run_file = write(tmp_path, document)
    result = run_cli("run", str(run_file), "--artifacts", str(tmp_path / "artifacts"))
    assert result.returncode == 1
    assert "Stage prepare of generation 0 failed" in result.stderr
    assert "no-such-images" in result.stderr  # from the tail of the job's log


def test_unknown_model_is_refused_before_anything_runs(tmp_path):
    document = tiny_run("typo", students=1)
    document["spec"]["students"][0]["model"] = "test_resnett"
    result = run_cli("run", str(write(tmp_path, document)), "--artifacts", str(tmp_path / "artifacts"))
    assert result.returncode == 2
    assert "spec.students[0].model: unknown timm model 'test_resnett'" in result.stderr
    assert "test_resnet" in result.stderr  # close match offered
    assert not (tmp_path / "artifacts").exists()


def test_invalid_run_file_names_the_field(tmp_path):
    document = tiny_run("bad")
    document["spec"]["pseudoLabels"] = {"confidenceThreshold": 3}
    result = run_cli("run", str(write(tmp_path, document)))
    assert result.returncode == 2
    assert "spec.pseudoLabels.confidenceThreshold" in result.stderr


def test_run_with_artifacts_on_a_real_s3_server(tmp_path, s3_prefix):
    """Jobs inherit the standard AWS environment and keep every artifact in S3."""
    from noisy_student_workloads.store import open_store

    run_file = write(tmp_path, tiny_run("on-s3", students=1))
    result = run_cli("run", str(run_file), "--artifacts", s3_prefix, "--output", "json")
    assert result.returncode == 0, result.stderr[-4000:]
    status = json.loads(result.stdout)
    assert status["stage"] == "Succeeded"
    assert status["artifacts"] == f"{s3_prefix}default/on-s3/"
    store = open_store(s3_prefix)
    for path in ("gen-0/teacher/_DONE.json", "gen-1/balance/manifest.npz", "gen-1/student/checkpoint.pt",
                 "status.json", "top1.png"):
        assert store.exists(f"{s3_prefix}default/on-s3/{path}"), path


def test_failed_run_stays_failed_until_its_file_changes(tmp_path):
    document = tiny_run("fix-me", students=1)
    document["spec"]["data"]["prepare"] = {"source": "folder", "path": str(tmp_path / "images"),
                                           "labelsPerClass": 2}
    artifacts = str(tmp_path / "artifacts")
    run_file = write(tmp_path, document)
    assert run_cli("run", str(run_file), "--artifacts", artifacts).returncode == 1
    again = run_cli("run", str(run_file), "--artifacts", artifacts)
    assert again.returncode == 1 and "Stage prepare of generation 0 failed" in again.stderr

    # Fix the data (two tiny classes of images) and the spec that points at it.
    from PIL import Image

    for label in ("a", "b"):
        (tmp_path / "fixed" / label).mkdir(parents=True)
        for i in range(12):
            Image.new("L", (16, 16), color=20 * i + (100 if label == "b" else 0)).save(
                tmp_path / "fixed" / label / f"{i}.png")
    document["spec"]["data"]["numClasses"] = 2
    document["spec"]["data"]["prepare"] = {"source": "folder", "path": str(tmp_path / "fixed"),
                                           "labelsPerClass": 2, "validationSize": 4}
    result = run_cli("run", str(write(tmp_path, document)), "--artifacts", artifacts, "--output", "json")
    assert result.returncode == 0, result.stderr[-3000:]
    status = json.loads(result.stdout)
    assert status["stage"] == "Succeeded" and status["observedGeneration"] == 2
    assert [j["name"] for j in status["jobs"] if j["stage"] == "prepare"] == ["fix-me-g0-prepare",
                                                                          "fix-me-g0-prepare-1"]
