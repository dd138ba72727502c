"""Workload entry points end to end on real (tiny) data: teacher → label → balance → student,
two-process DDP through TorchX ``local_cwd``, and a killed training job that resumes."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch

from noisy_student_workloads import balance, components, label, predictions, train
from noisy_student_workloads.manifest import Manifest
from noisy_student_workloads.datasets import pack_dataset
from noisy_student_workloads.shards import ShardWriter, encode_png
from noisy_student_workloads.store import FileStore, open_store

pytestmark = pytest.mark.e2e

MODEL = "test_resnet"
IMAGE_SIZE = 16


def uri(path) -> str:
    return f"file://{path}"


def read_json(path) -> dict:
    return json.loads(open(path).read())


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> dict:
    """scikit-learn digits packed into shards: 10 labels per class, 4 unlabeled shards."""
    out = tmp_path_factory.mktemp("digits")
    return pack_dataset("digits", uri(out) + "/", labels_per_class=10, seed=0, shard_size=400,
                        validation_size=300)["patterns"]


def train_config(data: dict, output, **overrides) -> dict:
    cfg = {
        "role": "teacher", "model": MODEL, "num_classes": 10, "image_size": IMAGE_SIZE,
        "labeled": data["labeled"], "validation": data["validation"], "pseudo": None,
        "noise": {"rand_augment": None, "dropout": 0.0, "stochastic_depth": 0.0},
        "epochs": 1, "batch_size": 16, "lr": 0.05, "weight_decay": 5e-5, "optimizer": "sgd",
        "warmup_epochs": 0, "seed": 0, "teacher": None, "allow_smaller_student": False, "workers": 0,
        "output": uri(output) + "/",
    }
    cfg.update(overrides)
    return cfg


def test_teacher_label_balance_student(digits, tmp_path, monkeypatch):
    monkeypatch.setattr(predictions, "PART_ROWS", 256)  # several parts per replica, as a large unlabeled set has
    run = tmp_path / "run"
    # the validation shards stand in for a test split here: scored once at the end
    teacher_cfg = {**train_config(digits, run / "gen-0/teacher"), "test": digits["validation"]}
    assert train.main(["--config", json.dumps(teacher_cfg)]) == 0
    teacher = read_json(run / "gen-0/teacher/_DONE.json")
    assert teacher["stage"] == "teacher"
    assert 0.0 <= teacher["metrics"]["top1"] <= teacher["metrics"]["top5"] <= 1.0
    assert {os.path.basename(u) for u in teacher["outputs"]} == {"checkpoint.pt", "config.json", "metrics.json"}
    assert (run / "gen-0/teacher/checkpoints/epoch-001.pt").exists()
    metrics = read_json(run / "gen-0/teacher/metrics.json")
    assert metrics["epochs"] == 1 and [h["epoch"] for h in metrics["history"]] == [1]
    assert metrics["images_per_second"] > 0
    # the weight EMA is what was scored and what labels (google-research/noisystudent evaluates its EMA)
    assert metrics["weights"] == "ema" and 0.0 <= metrics["top1_raw"] <= 1.0
    assert "ema" in torch.load(run / "gen-0/teacher/checkpoint.pt", weights_only=True)
    # robustness: the final model scored on corrupted copies of validation images, three severities each
    assert sorted(metrics["corruption"]) == ["brightness", "contrast", "gaussian_blur", "gaussian_noise", "pixelate"]
    assert all(len(v) == 3 for v in metrics["corruption"].values()) and 0.0 <= metrics["corruption_top1"] <= 1.0
    assert metrics["test_top1"] == metrics["top1"] and metrics["test_images"] == metrics["validation_images"]

    labels = run / "gen-1/labels"
    label_cfg = json.dumps({"checkpoint": uri(run / "gen-0/teacher/checkpoint.pt"), "unlabeled": digits["unlabeled"],
                            "batch_size": 256, "topk": 5, "output": uri(labels) + "/"})
    assert label.main(["--config", label_cfg, "--replica-id", "1", "--num-replicas", "2"]) == 0
    assert not (labels / "_DONE.json").exists()  # replica 0 has not finished
    assert label.main(["--config", label_cfg, "--replica-id", "0", "--num-replicas", "2"]) == 0
    done = read_json(labels / "_DONE.json")
    assert done["metrics"]["images"] == 1397 and done["metrics"]["replicas"] == 2
    # each replica's progress (images of its own total, the stage's total from the packing marker): finished
    progress = [read_json(labels / f"progress-0000{r}.json") for r in (0, 1)]
    assert [p["images"] for p in progress] == [p["images_total"] for p in progress]
    assert sum(p["images"] for p in progress) == 1397 and {p["stage_images_total"] for p in progress} == {1397}
    assert all(p["done"] and p["eta_seconds"] == 0 and p["images_per_second"] > 0 for p in progress)
    assert not any("progress" in os.path.basename(u) for u in done["outputs"])  # not an output
    with np.load(labels / "part-00000-00000.npz") as part0, np.load(labels / "part-00001-00000.npz") as part1:
        assert not set(part0["keys"]) & set(part1["keys"])  # disjoint shards
        assert part0["probs"].dtype == np.float16 and part0["probs"].shape[1] == 10
        np.testing.assert_allclose(part0["probs"].astype(np.float32).sum(axis=1), 1.0, atol=1e-2)
    parts = list(predictions.read_parts(uri(labels) + "/"))
    assert len(parts) >= 4 and all(len(p["keys"]) <= 256 + 255 for p in parts)
    labeled = {k: np.concatenate([p[k] for p in parts]) for k in ("keys", "classes", "confidences", "probs")}
    assert len(labeled["keys"]) == len(set(labeled["keys"])) == 1397
    stats = read_json(labels / "stats-00000.json")
    assert len(stats["histograms"]) == 10 and len(stats["histograms"][0]) == 100
    # A replica rerun (e.g. a retried pod) rewrites the same stage marker.
    assert label.main(["--config", label_cfg, "--replica-id", "0", "--num-replicas", "2"]) == 0
    assert read_json(labels / "_DONE.json") == done

    balanced = run / "gen-1/balance"
    balance_cfg = {"labels": uri(labels) + "/", "num_classes": 10, "confidence_threshold": 0.0,
                   "images_per_class": 50, "balance": True, "seed": 0, "output": uri(balanced) + "/"}
    assert balance.main(["--config", json.dumps(balance_cfg)]) == 0
    marker = read_json(balanced / "_DONE.json")
    per_class = marker["metrics"]["per_class"]  # a 1-epoch teacher may never predict some classes
    assert set(per_class) <= {0, 50} and sum(per_class) >= 50
    # streamed part by part, the same as balancing every prediction in memory; one block per unlabeled shard
    sel = balance.select(labeled["classes"], labeled["confidences"], 10, 0.0, 50, seed=0,
                         histograms=predictions.read_histograms(uri(labels) + "/"))
    index = Manifest.open(uri(balanced / "manifest.json"))
    assert index.images == sum(per_class) and index.rows == len(sel.indices)
    assert set(index.shards) <= {f"unlabeled-{i:06d}.tar" for i in range(4)}
    blocks = [index.block(name) for name in index.shards]
    kept = {k: v for b in blocks for k, v in zip(b["keys"].tolist(), b["copies"].tolist())}
    assert kept == dict(zip(labeled["keys"][sel.indices].tolist(), sel.copies.tolist()))
    probs = {k: p for b in blocks for k, p in zip(b["keys"].tolist(), b["probs"])}
    np.testing.assert_array_equal(np.stack([probs[k] for k in labeled["keys"][sel.indices].tolist()]),
                                  labeled["probs"][sel.indices])
    assert len(read_json(balanced / "thresholds.json")["classes"]) == 10

    student_cfg = train_config(
        digits, run / "gen-1/student", role="student",
        pseudo={"manifest": uri(balanced / "manifest.json"), "unlabeled": digits["unlabeled"], "type": "soft",
                "temperature": 1.0, "ratio": 2},
        noise={"rand_augment": {"ops": 2, "magnitude": 9}, "dropout": 0.5, "stochastic_depth": 0.2},
        teacher={"model": MODEL, "parameters": teacher["metrics"]["parameters"]},
    )
    assert train.main(["--config", json.dumps(student_cfg)]) == 0
    student = read_json(run / "gen-1/student/_DONE.json")
    assert student["stage"] == "student" and student["metrics"]["pseudo_images"] == sum(per_class)
    assert 0.0 <= student["metrics"]["top1"] <= 1.0


def test_errors_leave_no_marker(digits, tmp_path):
    empty = tmp_path / "empty-000000.tar"
    with tarfile.open(empty, "w"):
        pass
    teacher_out = tmp_path / "teacher"
    smaller = train_config(digits, teacher_out, role="student", teacher={"model": "resnet50", "parameters": 10**8},
                           pseudo={"manifest": uri(tmp_path / "m.npz"), "unlabeled": uri(empty)})
    assert train.main(["--config", json.dumps(smaller)]) == 2
    assert train.main(["--config", json.dumps(train_config(digits, teacher_out, num_classes=5))]) == 2
    assert not (teacher_out / "_DONE.json").exists()
    assert train.main(["--config", json.dumps(train_config(digits, teacher_out))]) == 0

    labels = tmp_path / "labels"
    cfg = json.dumps({"checkpoint": uri(teacher_out / "checkpoint.pt"), "unlabeled": uri(empty),
                      "output": uri(labels) + "/"})
    assert label.main(["--config", cfg]) == 2
    assert not (labels / "_DONE.json").exists()
    missing = json.dumps({"checkpoint": uri(teacher_out / "checkpoint.pt"),
                          "unlabeled": uri(tmp_path / "nothing-{000000..000001}.tar"), "output": uri(labels) + "/"})
    assert label.main(["--config", missing]) == 2

    # A teacher with NaN weights is never used to label (every pseudo-label would become class 0).
    payload = torch.load(teacher_out / "checkpoint.pt", weights_only=True)
    for weights in ("state_dict", "ema"):  # labeling uses the EMA weights when the checkpoint has them
        if weights in payload:
            next(v for v in payload[weights].values() if v.is_floating_point()).fill_(float("nan"))
    torch.save(payload, tmp_path / "nan.pt")
    nan_cfg = json.dumps({"checkpoint": uri(tmp_path / "nan.pt"), "unlabeled": digits["unlabeled"],
                          "output": uri(tmp_path / "nan-labels") + "/"})
    assert label.main(["--config", nan_cfg]) == 2
    assert not list((tmp_path / "nan-labels").glob("part-*"))


def test_non_finite_loss_fails_clearly_and_saves_no_weights(digits, tmp_path, capsys):
    out = tmp_path / "diverged"
    assert train.main(["--config", json.dumps(train_config(digits, out, epochs=2, lr=1e30))]) == 2
    assert "loss: not finite" in capsys.readouterr().err
    assert not (out / "checkpoints").exists() and not (out / "checkpoint.pt").exists()
    assert not (out / "_DONE.json").exists()


def test_a_corrupt_png_read_by_a_data_worker_process_names_shard_and_key(digits, tmp_path, capsys, monkeypatch):
    """The error comes from a DataLoader worker process (which wraps it in its traceback): the stage exits 2 with
    one line naming the shard and the key, as when read in the main process."""
    monkeypatch.setenv("NSO_CPU_SLOTS_DIR", str(tmp_path / "slots"))  # this process alone: 2 cores, 1 data worker
    digit = np.zeros((8, 8), np.uint8)
    with ShardWriter(FileStore(), uri(tmp_path / "labeled-%06d.tar"), 20) as w:
        for i in range(40):
            png = encode_png(digit + i)
            w.write(f"img-{i:03d}", png[:40] if i == 27 else png, i % 10)  # one PNG cut short
    cfg = train_config(digits, tmp_path / "out", labeled=uri(tmp_path / "labeled-{000000..000001}.tar"), workers=1)
    assert train.main(["--config", json.dumps(cfg)]) == 2
    err = capsys.readouterr().err
    assert '"workers": 1' in err  # the sample was decoded in a worker process
    message = err.strip().splitlines()[-1]
    assert re.fullmatch(r"error: .*/labeled-000001\.tar: sample 'img-027': cannot decode image: .*", message), err
    assert "Traceback" not in err
    assert not (tmp_path / "out/_DONE.json").exists()


def torchrun(cfg: dict, log) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "noisy_student_workloads.train", "--config", json.dumps(cfg)]
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=600)


def test_two_rank_resume_restores_each_ranks_own_rng(digits, tmp_path):
    noise = {"rand_augment": {"ops": 1, "magnitude": 5}, "dropout": 0.3, "stochastic_depth": 0.2}
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    with open(tmp_path / "torchrun.log", "w") as log:
        assert torchrun(train_config(digits, whole, epochs=2, batch_size=8, noise=noise), log).returncode == 0
        (resumed / "checkpoints").mkdir(parents=True)
        shutil.copy(whole / "checkpoints/epoch-001.pt", resumed / "checkpoints/epoch-001.pt")
        assert torchrun(train_config(digits, resumed, epochs=2, batch_size=8, noise=noise), log).returncode == 0
    a = torch.load(whole / "checkpoints/epoch-002.pt", weights_only=False)
    b = torch.load(resumed / "checkpoints/epoch-002.pt", weights_only=False)
    assert len(a["rng"]) == len(b["rng"]) == 2
    assert not torch.equal(a["rng"][0]["torch"], a["rng"][1]["torch"])  # ranks draw distinct dropout masks
    for rank in (0, 1):  # each rank continued its own stream, as without the interruption
        assert torch.equal(a["rng"][rank]["torch"], b["rng"][rank]["torch"])
        assert a["rng"][rank]["python"] == b["rng"][rank]["python"]
    for name, weight in a["model"].items():
        torch.testing.assert_close(b["model"][name], weight, rtol=1e-4, atol=1e-5, msg=name)


def test_ddp_two_processes_through_local_cwd(digits, tmp_path):
    from torchx.runner import get_runner
    from torchx.specs import AppState

    out = tmp_path / "ddp"
    cfg = json.dumps(train_config(digits, out, batch_size=8))
    app = components.train(cfg, str(tmp_path), nnodes="1", nproc_per_node=2, env=components.local_env(),
                           name="ddp-test")
    runner = get_runner()
    try:
        dryrun = runner.dryrun(app, "local_cwd", cfg={"log_dir": str(tmp_path / "logs")})
        handle = runner.schedule(dryrun)
        status = runner.wait(handle, wait_interval=1)
    finally:
        runner.close()
    assert status is not None and status.state == AppState.SUCCEEDED, status
    metrics = read_json(out / "metrics.json")
    assert metrics["world_size"] == 2
    assert (out / "_DONE.json").exists()


def test_killed_training_resumes_from_its_checkpoint(tmp_path):
    data = pack_dataset("digits", uri(tmp_path / "data") + "/", labels_per_class=100, seed=0, shard_size=1000,
                        validation_size=200)["patterns"]
    out = tmp_path / "resume"
    cfg = json.dumps(train_config(data, out, epochs=4, batch_size=8))
    cmd = [sys.executable, "-m", "noisy_student_workloads.train", "--config", cfg]
    first_checkpoint = out / "checkpoints/epoch-001.pt"
    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen(cmd, stderr=log)
        deadline = time.monotonic() + 300
        while not first_checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "_DONE.json").exists()

    second = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    events = [json.loads(line) for line in second.stderr.splitlines() if line.startswith("{")]
    resume = next(e for e in events if e["event"] == "resume")
    epochs = [e["epoch"] for e in events if e["event"] == "epoch"]
    assert epochs[0] == resume["epoch"] + 1 and epochs[-1] == 4
    assert resume["epoch"] >= 1
    metrics = read_json(out / "metrics.json")
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4]
    progress = read_json(out / "progress.json")
    assert {k: progress[k] for k in ("epoch", "epochs", "top1", "eta_seconds")} == {
        "epoch": 4, "epochs": 4, "top1": metrics["top1"], "eta_seconds": 0}
    assert progress["images_per_second"] > 0
    # only the last keep_checkpoints (default 2) epoch checkpoints are kept
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-003.pt", "epoch-004.pt"]
    assert open_store(uri(out)).exists(uri(out / "_DONE.json"))


def _two_rank_epoch(rank: int, store: str, results: str) -> None:
    """One rank of a two-process DDP epoch (gloo); rank 1's last batch has a non-finite pseudo label."""
    import torch.distributed as dist
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from torch.nn.parallel import DistributedDataParallel

    from noisy_student_workloads.models import create_model, normalization

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)
    raw = create_model(MODEL, 10, 0.0, 0.0)
    model = DistributedDataParallel(raw)
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.01)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=1, updates_per_epoch=3,
                                       step_on_epochs=False)
    g = torch.Generator().manual_seed(rank)
    data = [(torch.randint(0, 256, (6, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8, generator=g),
             torch.softmax(torch.randn(6, 10, generator=g), dim=1), 2) for _ in range(3)]
    if rank == 1:
        data[-1][1][-1, 0] = float("nan")  # on this rank only, at the epoch's last step
    mean, std = normalization(raw)
    d = train.Dist(rank=rank, world=2, local_world=2, device=torch.device("cpu"))
    try:
        train.train_epoch(model, data, optimizer, scheduler, 0, mean, std, d, 0)
        outcome = "returned"
    except train.NonFiniteLoss:
        outcome = "NonFiniteLoss"
    with open(f"{results}.{rank}", "w") as f:
        f.write(outcome)
    dist.destroy_process_group()


def test_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    """Were the check per rank, the others would go on to evaluation and wait in its all_reduce
    for the rank that stopped, until the process group's timeout."""
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_epoch, args=(str(tmp_path / "store"), str(tmp_path / "outcome")), nprocs=2, join=True)
    assert [(tmp_path / f"outcome.{rank}").read_text() for rank in (0, 1)] == ["NonFiniteLoss"] * 2
