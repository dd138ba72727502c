"""One training job on every core against jobs side by side, each pinned to cores of its own — a benchmark.

Why ``bench/efficacy.py`` runs its jobs side by side (``--jobs``): a small
model on a CPU does not scale across torch threads. Each round trains the
same supervised epoch (Fashion-MNIST, the efficacy example's model and
noise) first as one process on all of this process's cores, then as
``--jobs`` copies at once, each pinned to its share of the cores (the
workload sizes its threads and data workers by its affinity,
``noisy_student_workloads.runtime``). It prints the images/s of each
side (the workload's own figure: its training loop) and the ratio of the
copies' summed images/s to the single job's, per round and as the median
of the rounds' own ratios (the two sides of a round ran next to each
other in time). Needs the IDX files of the Debian package
``dataset-fashion-mnist``.

    python bench/side_by_side.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from efficacy import EXAMPLE, locate_idx, pack_supervised_data, pinned, split_cores  # noqa: E402

import yaml  # noqa: E402


def train_config(spec: dict, data: Path, output: Path, epochs: int) -> dict:
    """The efficacy example's teacher model and noise, supervised epochs of every training label."""
    noise = spec["noise"]
    return {"role": "teacher", "model": spec["teacher"]["model"], "model_args": spec["teacher"].get("modelArgs", {}),
            "num_classes": spec["data"]["numClasses"], "image_size": spec["data"]["imageSize"],
            "labeled": data.as_uri() + "/labeled-*.tar", "validation": data.as_uri() + "/validation-*.tar",
            "noise": {"rand_augment": noise["randAugment"], "dropout": noise["dropout"],
                      "stochastic_depth": noise["stochasticDepth"]},
            "epochs": epochs, "batch_size": 256, "workers": 0, "corruption_images": 0, "eval_images": 100,
            "output": output.as_uri() + "/"}


def start(config: dict, directory: Path, cores: list[int]) -> subprocess.Popen:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config | {"output": (directory / "out").as_uri() + "/"}))
    log = (directory / "log").open("w")
    cmd = pinned([sys.executable, "-m", "noisy_student_workloads.train", "--config",
                  (directory / "config.json").as_uri()], cores)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def images_per_second(directory: Path, process: subprocess.Popen) -> float:
    if process.wait() != 0:
        raise SystemExit("training failed:\n" + "".join((directory / "log").read_text().splitlines(True)[-20:]))
    return json.loads((directory / "out" / "metrics.json").read_text())["images_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="copies side by side (each on cores/jobs cores)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data", help="directory of the Fashion-MNIST IDX files")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if args.jobs < 2 or args.jobs > len(cores):
        parser.error(f"--jobs must be between 2 and the {len(cores)} cores this process may use")
    idx = locate_idx(args.data)
    with tempfile.TemporaryDirectory(prefix="side-by-side-") as tmp:
        work = Path(tmp)
        spec = yaml.safe_load(EXAMPLE.read_text())["spec"]
        data = pack_supervised_data(idx, work, spec, dict(os.environ))
        config = train_config(spec, data, work, args.epochs)
        shares = split_cores(cores, args.jobs)
        print(f"| round | one job on {len(cores)} cores, img/s | {args.jobs} jobs side by side, img/s (sum) | ratio |")
        print("|---|---|---|---|")
        ratios = []
        for r in range(args.rounds):
            solo = images_per_second(work / f"{r}-solo", start(config, work / f"{r}-solo", cores))
            dirs = [work / f"{r}-job{j}" for j in range(args.jobs)]
            running = [start(config, d, share) for d, share in zip(dirs, shares)]
            together = sum(images_per_second(d, p) for d, p in zip(dirs, running))
            ratios.append(together / solo)
            print(f"| {r + 1} | {solo:,.0f} | {together:,.0f} | {together / solo:.2f} |", flush=True)
        print(f"\nmedian ratio {statistics.median(ratios):.2f} over {args.rounds} rounds; load average "
              f"{os.getloadavg()[0]:.1f} (1 min) at the end")


if __name__ == "__main__":
    main()
