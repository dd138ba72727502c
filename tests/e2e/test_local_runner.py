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


def stage_dir(prefix: Path, kind: str, generation: int = 0) -> Path:
    """A stage's output directory, from the run's manifest of stage keys (`<run>/stages.json`)."""
    manifest = json.loads((prefix / "stages.json").read_text())
    uri = next(s["uri"] for s in manifest["stages"] if s["stage"] == kind and s["generation"] == generation)
    return Path(uri.removeprefix("file://"))


def job_names(status: dict, kind: str) -> list[str]:
    return [j["name"] for j in status["jobs"] if j["stage"] == kind]


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
    for kind, generation, name in (("prepare", 0, "_DONE.json"), ("teacher", 0, "_DONE.json"),
                                   ("label", 1, "_DONE.json"), ("balance", 1, "_DONE.json"),
                                   ("student", 2, "checkpoint.pt")):
        path = stage_dir(prefix, kind, generation) / name
        assert path.exists(), path
        assert path.is_relative_to(artifacts / "default" / "stages" / kind)
    for name in ("top1.png", "status.json", "stages.json", "report.html"):
        assert (prefix / name).exists(), name
    names = [j["name"] for j in status["jobs"]]
    assert len(names) == len(set(names)) == 1 + 1 + 3 * 2 + 1  # prepare, teacher, 2 students' stages, export

    again = run_cli("status", str(run_file), "--artifacts", str(artifacts), "--output", "json")
    assert json.loads(again.stdout)["generations"] == status["generations"]


def test_interrupted_run_resumes_without_redoing_stages(tmp_path):
    run_file = write(tmp_path, tiny_run("resume", students=1, epochs=2))
    artifacts = tmp_path / "artifacts"
    prefix = artifacts / "default" / "resume"
    process = subprocess.Popen([*CLI, "run", str(run_file), "--artifacts", str(artifacts)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not (prefix / "stages.json").exists() or not (stage_dir(prefix, "teacher") / "_DONE.json").exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=120)
    assert process.returncode != 0
    teacher_marker = (stage_dir(prefix, "teacher") / "_DONE.json").stat().st_mtime

    result = run_cli("run", str(run_file), "--artifacts", str(artifacts), "--output", "json")
    assert result.returncode == 0, result.stderr[-4000:]
    status = json.loads(result.stdout)
    assert status["stage"] == "Succeeded"
    assert (stage_dir(prefix, "teacher") / "_DONE.json").stat().st_mtime == teacher_marker
    assert len(job_names(status, "prepare")) == len(job_names(status, "teacher")) == 1


def job_processes(local_root: Path, job_prefix: str) -> dict[int, str]:
    """Live processes of local jobs (TorchX local_cwd) whose job name starts with `job_prefix`."""
    wanted = f"NSO_LOCAL_JOB={local_root.resolve()}::{job_prefix}".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and any(v.startswith(wanted) for v in (entry / "environ").read_bytes().split(b"\0")):
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:200]
        except OSError:
            continue
    return found


def test_sigkilled_runner_leaves_no_job_process_and_the_rerun_runs_the_stage_once_more(tmp_path):
    """SIGKILL the local runner while the teacher trains: no process of the teacher's job survives
    it; the rerun trains the teacher once more (the same job, never two copies at once) and resumes."""
    run_file = write(tmp_path, tiny_run("killed", students=1, epochs=6))
    artifacts = tmp_path / "artifacts"
    prefix = artifacts / "default" / "killed"
    local = prefix / "local"
    process = subprocess.Popen([*CLI, "run", str(run_file), "--artifacts", str(artifacts)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    # The teacher's worker trains (it writes progress.json), under torchrun.
    while not (prefix / "stages.json").exists() or not (stage_dir(prefix, "teacher") / "progress.json").exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "the teacher never started training"
        time.sleep(0.2)
    assert len(job_processes(local, "teacher-")) >= 2, job_processes(local, "teacher-")
    assert not (stage_dir(prefix, "teacher") / "_DONE.json").exists()
    process.kill()
    process.wait(timeout=60)
    deadline = time.time() + 30  # the guard's grace (10 s) on a loaded machine
    while job_processes(local, ""):
        assert time.time() < deadline, f"left behind: {job_processes(local, '')}"
        time.sleep(0.5)
    assert not (stage_dir(prefix, "teacher") / "_DONE.json").exists()  # it died; it did not finish

    result = run_cli("run", str(run_file), "--artifacts", str(artifacts), "--output", "json")
    assert result.returncode == 0, result.stderr[-4000:]
    status = json.loads(result.stdout)
    assert status["stage"] == "Succeeded"
    assert len(job_names(status, "teacher")) == 1  # the same job again, not a retry
    assert "adopting" not in result.stderr  # nothing of the killed runner was left to adopt
    logs = sorted(p.name for p in (local / "logs").glob("*/teacher-*"))
    assert len(logs) == 2, logs  # the killed copy and the one that finished


def test_failing_stage_exits_non_zero_with_stage_and_log(tmp_path):
    document = tiny_run("broken", students=1)
    missing = tmp_path / "no-such-images"
    document["spec"]["data"]["prepare"] = {"source": "folder", "path": str(missing), "labelsPerClass": 1}
    run_file = write(tmp_path, document)
    result = run_cli("run", str(run_file), "--artifacts", str(tmp_path / "artifacts"))
    assert result.returncode == 1
    assert "Stage prepare of generation 0 failed" in result.stderr
    assert "no-such-images" in result.stderr  # from the tail of the job's log


def test_a_training_stages_config_error_through_torchrun_fails_the_run_without_a_retry(tmp_path):
    """torchrun's agent exits 1 whatever its worker's exit code: the worker's reason reaches the
    runner through torchrun's error file (TorchX's reply file), so the run fails InvalidConfig at once."""
    document = tiny_run("config-error", retry={"limit": 2, "backoffSeconds": 1, "maxBackoffSeconds": 1})
    document["spec"]["training"]["batchSize"] = 1
    document["spec"]["resources"]["train"] = {"procsPerNode": 2}  # a batch of 1 for 2 processes: refused
    artifacts = tmp_path / "artifacts"
    result = run_cli("run", str(write(tmp_path, document)), "--artifacts", str(artifacts))
    assert result.returncode == 1, result.stderr[-3000:]
    status = json.loads((artifacts / "default" / "config-error" / "status.json").read_text())
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidConfig", failed
    assert "ConfigError: batch_size: 1 is smaller than the 2 training processes" in failed["message"], failed
    assert len(job_names(status, "teacher")) == 1  # never retried


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
    stages = {(s["stage"], s["generation"]): s["uri"]
              for s in store.get_json(f"{s3_prefix}default/on-s3/stages.json")["stages"]}
    for (kind, generation), name in {("teacher", 0): "_DONE.json", ("balance", 1): "manifest.json",
                                     ("student", 1): "checkpoint.pt"}.items():
        assert stages[(kind, generation)].startswith(f"{s3_prefix}default/stages/{kind}/")
        assert store.exists(stages[(kind, generation)] + name), (kind, name)
    for path in ("status.json", "top1.png"):
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
    # The fixed data is another prepare stage (another key): a new job, not a retry of the old one.
    first, second = job_names(status, "prepare")
    assert first.split("-")[1] != second.split("-")[1]


def test_an_edit_reruns_only_what_it_changes_and_says_what_it_kept(tmp_path):
    document = tiny_run("edit", students=1)
    artifacts = tmp_path / "artifacts"
    prefix = artifacts / "default" / "edit"
    run_file = write(tmp_path, document)
    first = run_cli("run", str(run_file), "--artifacts", str(artifacts), "--output", "json")
    assert first.returncode == 0, first.stderr[-4000:]
    teacher = stage_dir(prefix, "teacher")
    teacher_marker = (teacher / "_DONE.json").stat().st_mtime
    old_student = stage_dir(prefix, "student", 1)

    # A student's epochs: only that student trains again.
    document["spec"]["students"][0]["epochs"] = 2
    second = run_cli("run", str(write(tmp_path, document)), "--artifacts", str(artifacts), "--output", "json")
    assert second.returncode == 0, second.stderr[-4000:]
    # The export reads every generation's model, so it runs again after any of them does.
    assert ("2 stage(s) to run (student of generation 1, export of the best model); "
            "kept data preparation, teacher training") in second.stderr
    status = json.loads(second.stdout)
    assert (teacher / "_DONE.json").stat().st_mtime == teacher_marker
    assert stage_dir(prefix, "teacher") == teacher and stage_dir(prefix, "student", 1) != old_student
    assert len(job_names(status, "teacher")) == len(job_names(status, "label")) == 1
    assert len(job_names(status, "student")) == 2
    assert status["generations"][1]["key"] == stage_dir(prefix, "student", 1).name
    epochs = json.loads((stage_dir(prefix, "student", 1) / "metrics.json").read_text())["epochs"]
    assert epochs == 2

    # The teacher's epochs: the teacher trains again (and everything after it).
    document["spec"]["teacher"]["epochs"] = 2
    third = run_cli("run", str(write(tmp_path, document)), "--artifacts", str(artifacts), "--output", "json")
    assert third.returncode == 0, third.stderr[-4000:]
    assert "kept data preparation." in third.stderr
    assert stage_dir(prefix, "teacher") != teacher
    assert (teacher / "_DONE.json").stat().st_mtime == teacher_marker  # the old one is kept for gc to judge
    assert len(job_names(json.loads(third.stdout), "teacher")) == 2


def test_another_run_with_the_same_teacher_reuses_it_and_says_from_which_run(tmp_path):
    artifacts = tmp_path / "artifacts"
    first = run_cli("run", str(write(tmp_path, tiny_run("first", students=1))), "--artifacts", str(artifacts))
    assert first.returncode == 0, first.stderr[-4000:]
    document = tiny_run("second", students=1, pseudoLabels={"type": "hard"})
    second = run_cli("run", str(write(tmp_path, document)), "--artifacts", str(artifacts), "--output", "json")
    assert second.returncode == 0, second.stderr[-4000:]
    assert "Reused teacher training" in second.stderr and "computed by run default/first" in second.stderr
    status = json.loads(second.stdout)
    states = {(s["stage"], s["generation"]): (s["state"], s.get("producedBy")) for s in status["stages"]}
    assert states[("teacher", 0)] == ("Reused", "default/first")
    assert states[("balance", 1)] == ("Reused", "default/first")
    assert states[("student", 1)] == ("Complete", "default/second")
    assert [j["stage"] for j in status["jobs"]] == ["student", "export"]


def test_two_invocations_of_one_file_never_run_a_stage_twice(tmp_path):
    run_file = write(tmp_path, tiny_run("twice", students=1, epochs=2))
    artifacts = tmp_path / "artifacts"
    command = [*CLI, "run", str(run_file), "--artifacts", str(artifacts), "--output", "json"]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=900) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err[-4000:]
        assert json.loads(out)["stage"] == "Succeeded"
    # Every job that ran left its log directory under the run's local root: one per stage.
    logs = sorted(p.name for p in (artifacts / "default" / "twice" / "local" / "logs").glob("*/*"))
    kinds = [name.split("-")[0] for name in logs]
    assert sorted(kinds) == sorted(["prepare", "teacher", "label", "balance", "student", "export"]), logs
