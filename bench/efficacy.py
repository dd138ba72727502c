"""Does Noisy Student learn? Fashion-MNIST efficacy benchmark with ablations.

Runs ``examples/fashion-mnist.yaml`` (a teacher on 100 labels per class;
6,000 training images held out for validation, the other 53,000 unlabeled;
three noisy student generations) through the local runner, then, each one
change from that default run:

* ``no-noise``: students without RandAugment, dropout or stochastic depth;
* ``hard``: hard (argmax) pseudo labels instead of soft ones;
* ``no-balance``: filtered pseudo labels kept as they are, no class balancing;
* ``no-filter``: confidence threshold 0 (balancing still keeps the most
  confident images of over-full classes).

Ablations train one student generation (compare with the default's first).
Every run writes under one artifact root, so the stages an ablation would
redo identically have the same stage keys as the default run's and are
reused, not recomputed (see docs/stage-keys.md): the prepared data, the
teacher and its pseudo labels always, the balanced manifest for ``hard`` and
``no-noise`` (whose student alone drops the noise; the teacher keeps it).

Three reference models run through the train workload directly (a run needs
at least one student): the teacher without noise, and the fully supervised
upper bound on all training labels but validation's (5,399 per class; the
packer keeps at least one unlabeled image per class) with and without noise, each with the largest
student's model and the budget of the longest student generation: the same
number of steps of ``(1 + ratio) × B`` images. The upper bound is the better
of the two.

Every trained model is also scored on corrupted copies of evaluation images
(Gaussian noise, blur, contrast, brightness, pixelation at three severities;
``noisy_student_workloads.corruptions``), the paper's robustness claim; the
table and the plot show that accuracy per generation next to the clean one.

``--seeds N`` runs everything at training seeds 0..N-1 (the prepared data is
shared) and shows each cell as mean ± standard deviation. An ablation counts
as helping or hurting only when its difference from the default's first
student exceeds the seeds' spread (the larger standard deviation of the two).

The results end with the benchmark's checks: every student generation at or
above the previous one, the no-noise ablation below the noisy default by more
than the spread, and a gap closed of at least 50 %.

Output in ``--out`` (default ``bench/out/efficacy``): ``results.json``,
``results.md`` (a Markdown table: top-1 on the 10,000 test images, which
nothing is tuned on, per generation for every variant, and *gap closed* = (best student − teacher) / (supervised − teacher)),
``efficacy.png``, and one log per job under ``logs/``. Rerunning resumes: every
finished stage is kept. Seeds are fixed (``training.seed``, the split seed).

Budgets: the default fits two CPU cores in under an hour; ``--quick`` trains a
40-epoch teacher and 3-epoch students on 1,000 pseudo labels per class (a
smoke test: its students are too short to beat the teacher). On a GPU use
``--device cuda`` and ``--scale-epochs`` (multiplies every epoch count); see
the README's "Does it learn?" section.

    python bench/efficacy.py --quick
    python bench/efficacy.py --out /tmp/efficacy --seeds 3
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "fashion-mnist.yaml"
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
IDX_DIRS = ("/usr/share/datasets/fashion-mnist",)
# 6,000 training images per class, 600 of them carved for validation (10 %, the packer's default with a
# test split), and the packer needs at least one unlabeled image per class
ALL_LABELS_PER_CLASS = 5399

# name -> (what changes, spec edit); what an ablation shares with the default run follows from stage keys
ABLATIONS: dict[str, tuple[str, Any]] = {
    "no-noise": (
        "students without RandAugment, dropout, stochastic depth",
        lambda s: s["students"][0].update(noise={"randAugment": None, "dropout": 0.0, "stochasticDepth": 0.0}),
    ),
    "hard": ("hard pseudo labels", lambda s: s["pseudoLabels"].update(type="hard")),
    "no-balance": ("no class balancing", lambda s: s["pseudoLabels"].update(balance=False)),
    "no-filter": ("confidence threshold 0", lambda s: s["pseudoLabels"].update(confidenceThreshold=0.0)),
}


def locate_idx(explicit: str | None) -> Path:
    """The directory holding the four Fashion-MNIST IDX files (gzipped or not), or exit saying what to install."""
    candidates = [explicit] if explicit else [os.environ.get("FASHION_MNIST_DIR"), *IDX_DIRS]
    for candidate in filter(None, candidates):
        path = Path(candidate)
        if all((path / f).exists() or (path / f"{f}.gz").exists() for f in IDX_FILES):
            return path
    raise SystemExit(
        "Fashion-MNIST IDX files not found in " + ", ".join(filter(None, candidates)) + ".\n"
        "Install them with:  sudo apt-get install dataset-fashion-mnist\n"
        "or pass --data DIR (or set FASHION_MNIST_DIR) to a directory holding " + ", ".join(IDX_FILES) + " (.gz or not)."
    )


def default_run(args: argparse.Namespace, idx: Path) -> dict[str, Any]:
    """The example run file with this invocation's data path, labels and budget."""
    run = yaml.safe_load(EXAMPLE.read_text())
    spec = run["spec"]
    spec["data"]["prepare"].update(path=str(idx), labelsPerClass=args.labels_per_class)
    for item in [spec["teacher"], *spec["students"]]:
        if item.get("epochs"):
            item["epochs"] = max(1, round(item["epochs"] * args.scale_epochs))
    spec["training"]["epochs"] = max(1, round(spec["training"]["epochs"] * args.scale_epochs))
    if args.quick:
        spec["teacher"]["epochs"] = 40
        spec["training"]["epochs"] = 3
        for student in spec["students"]:
            student.pop("epochs", None)
        spec["pseudoLabels"]["imagesPerClass"] = 1000
    if args.device == "cuda":
        spec["resources"].update(gpu=1, workers=max(spec["resources"].get("workers", 0), 4))
    return run


def variant_run(base: dict[str, Any], name: str) -> dict[str, Any]:
    run = copy.deepcopy(base)
    run["metadata"]["name"] = f"fashion-mnist-{name}"
    spec = run["spec"]
    spec["students"] = spec["students"][:1]
    ABLATIONS[name][1](spec)
    return run


def prefix_dir(out: Path, run: dict[str, Any]) -> Path:
    meta = run["metadata"]
    return out / "runs" / meta.get("namespace", "default") / meta["name"]


def child_env(device: str) -> dict[str, str]:
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_logged(cmd: list[str], log: Path, env: dict[str, str]) -> float:
    """Run ``cmd`` with its output in ``log``; returns wall seconds, exits on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    with log.open("a") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({code}); log {log}:\n{tail}")
    return time.perf_counter() - tic


def run_pipeline(run: dict[str, Any], out: Path, env: dict[str, str]) -> float:
    """One run file through ``noisy-student run``; stages with a marker under their key are reused."""
    run_file = out / "runfiles" / f"{run['metadata']['name']}.yaml"
    run_file.parent.mkdir(parents=True, exist_ok=True)
    run_file.write_text(yaml.safe_dump(run, sort_keys=False))
    cli = shutil.which("noisy-student", path=str(Path(sys.executable).parent)) or "noisy-student"
    return run_logged([cli, "run", str(run_file), "--artifacts", (out / "runs").as_uri(), "--output", "json"],
                      out / "logs" / f"{run['metadata']['name']}.log", env)


def run_direct(name: str, config: dict[str, Any], out: Path, env: dict[str, str]) -> tuple[dict[str, Any], float]:
    """A train workload outside any run (references); resumes, and skips a finished one, when it
    was given the same configuration (else its directory is started afresh: a changed recipe
    must not score the old model)."""
    stage = out / "direct" / name
    config = {**config, "output": stage.as_uri() + "/"}
    given = stage / "input-config.json"
    if given.exists() and json.loads(given.read_text()) != config:
        shutil.rmtree(stage)
    seconds = 0.0
    if not (stage / "_DONE.json").exists():
        stage.mkdir(parents=True, exist_ok=True)
        given.write_text(json.dumps(config, indent=1))
        seconds = run_logged([sys.executable, "-m", "noisy_student_workloads.train", "--config",
                              (stage / "input-config.json").as_uri()], out / "logs" / f"{name}.log", env)
    return json.loads((stage / "metrics.json").read_text()), seconds


def run_status(prefix: Path) -> dict[str, Any]:
    return json.loads((prefix / "status.json").read_text())


def stage_file(generation: dict[str, Any], name: str) -> Path:
    """A file next to a trained generation's checkpoint (its stage directory, under its key)."""
    return Path(generation["checkpoint"].removeprefix("file://")).parent / name


def generation_metrics(prefix: Path) -> list[dict[str, Any]]:
    """Metrics of gen-0 (teacher), gen-1... (students) of the run whose prefix this is."""
    return [json.loads(stage_file(g, "metrics.json").read_text()) for g in run_status(prefix)["generations"]]


def reused_stages(prefix: Path) -> list[str]:
    """The stages a run took from another run (``<stage>/g<generation>``)."""
    return [f"{s['stage']}/g{s['generation']}" for s in run_status(prefix)["stages"] if s["state"] == "Reused"]


def student_budget(spec: dict[str, Any], pseudo_images: int) -> tuple[int, int]:
    """(batch, epochs) of a 60k-label run seeing as many images as the longest student generation."""
    ratio = spec["training"]["unlabeledRatio"]
    batch = spec["training"]["batchSize"]
    labeled = spec["data"]["prepare"]["labelsPerClass"] * spec["data"]["numClasses"]
    steps = max(math.ceil(labeled / batch), math.ceil(pseudo_images / (ratio * batch)))
    epochs = max(student.get("epochs") or spec["training"]["epochs"] for student in spec["students"])
    images = steps * batch * (1 + ratio) * epochs
    supervised_batch = batch * (1 + ratio)
    all_labels = ALL_LABELS_PER_CLASS * spec["data"]["numClasses"]
    return supervised_batch, max(1, round(images / all_labels))


GAP_GOAL = 0.5


def spread(results: dict[str, Any], a: str, b: str, generation: int = 1) -> float:
    """The seeds' spread of two cells: the larger standard deviation of the two (0 with one seed)."""
    sds = [results["variants"][v].get("top1_sd", [])[generation:generation + 1] for v in (a, b)]
    return max([sd[0] for sd in sds if sd and sd[0] is not None], default=0.0)


def checks(results: dict[str, Any]) -> dict[str, bool | None]:
    """What the default run must show: each generation at or above the previous one, noise worth
    having (the no-noise ablation's student below the default's first by more than the seeds' spread),
    and the gap-closed goal. ``None`` where the variant needed was not run."""
    default = results["variants"]["default"]["top1"]
    no_noise = results["variants"].get("no-noise", {}).get("top1", [])
    gap = results["gap_closed"]["noisy_teacher"]
    noise_helps = None
    if len(no_noise) > 1 and len(default) > 1:
        noise_helps = default[1] - no_noise[1] > spread(results, "default", "no-noise")
    return {
        "generations_monotone": all(b >= a for a, b in zip(default, default[1:])),
        "noise_helps": noise_helps,
        "gap_closed_goal": gap >= GAP_GOAL if gap is not None else None,
    }


def ablation_effects(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each ablation's first student against the default's: the difference, the seeds' spread, and whether
    the change hurts or helps — only when the difference exceeds the spread (one seed: no spread to judge)."""
    default = results["variants"]["default"]["top1"]
    effects = {}
    for name, v in results["variants"].items():
        if name == "default" or len(v["top1"]) < 2 or len(default) < 2:
            continue
        diff, sd = v["top1"][1] - default[1], spread(results, "default", name)
        verdict = ("one seed" if len(results.get("seeds", [0])) < 2 else
                   "hurts" if diff < -sd else "helps" if diff > sd else "within the spread")
        effects[name] = {"difference": diff, "spread": sd, "verdict": verdict}
    return effects


def pct(x: float | None, sd: float | None = None) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}" if sd is None else f"{100 * x:.1f} ± {100 * sd:.1f}"


def render_table(results: dict[str, Any]) -> str:
    gens = max(len(v["top1"]) for v in results["variants"].values())
    head = ["variant", "change", "teacher"] + [f"student {k}" for k in range(1, gens)]
    seeds = results.get("seeds", [0])
    lines = [f"Top-1 % ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}"
             f"{': mean ± standard deviation' if len(seeds) > 1 else ''}):", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cells(v: dict[str, Any], key: str) -> list[str]:
        sds = v.get(f"{key}_sd") or [None] * len(v[key])
        return [pct(t, sd) for t, sd in zip(v[key], sds)] + [""] * (gens - len(v[key]))

    for name, v in results["variants"].items():
        lines.append(f"| {name} | {v['change']} | " + " | ".join(cells(v, "top1")) + " |")
    if any(t is not None for v in results["variants"].values() for t in v.get("corruption_top1", [])):
        lines += ["", "Robustness: top-1 % on corrupted copies of the evaluation images (noise, blur, contrast, "
                  "brightness, pixelation; three severities each; mean over all):", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, v in results["variants"].items():
            lines.append(f"| {name} | {v['change']} | " + " | ".join(cells(v, "corruption_top1")) + " |")
    ref = results["references"]
    lines += ["", "| reference | top-1 | corrupted top-1 |", "|---|---|---|"]
    lines += [f"| {name} | {pct(r['top1'], r.get('top1_sd'))} | {pct(r.get('corruption_top1'), r.get('corruption_top1_sd'))} |"
              for name, r in ref.items()]
    g = results["gap_closed"]
    lines += [
        "",
        f"Gap closed (best student − teacher) / (supervised − teacher): **{pct(g['noisy_teacher'])} %** against the "
        f"noisy teacher, {pct(g['plain_teacher'])} % against the teacher without noise "
        f"(supervised upper bound {pct(results['supervised_top1'])}).",
    ]
    effects = results.get("ablations") or {}
    if effects:
        lines += ["", "Ablations against the default's first student (a change counts only beyond the seeds' "
                  "spread, the larger standard deviation of the two cells): " + "; ".join(
                      f"{name} {100 * e['difference']:+.1f} (spread {100 * e['spread']:.1f}): {e['verdict']}"
                      for name, e in effects.items()) + "."]
    verdict = {True: "yes", False: "**no**", None: "not run"}
    c = results["checks"]
    lines += [
        "",
        f"Checks: every generation at or above the previous one: {verdict[c['generations_monotone']]}; "
        f"no-noise student below the noisy one by more than the spread: {verdict[c['noise_helps']]}; "
        f"gap closed ≥ {GAP_GOAL:.0%}: {verdict[c['gap_closed_goal']]}.",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    styles = {"supervised": ":", "teacher without noise": "--"}
    for ax, key, label in zip(axes, ("top1", "corruption_top1"), ("clean top-1 (%)", "corrupted top-1 (%)")):
        for name, v in results["variants"].items():
            points = [(g, 100 * t) for g, t in enumerate(v.get(key, [])) if t is not None]
            sds = v.get(f"{key}_sd") or [None] * len(v.get(key, []))
            if points:
                ax.errorbar([g for g, _ in points], [t for _, t in points], marker="o", label=name, capsize=3,
                            yerr=[100 * (sds[g] or 0.0) for g, _ in points])
        for name, r in results["references"].items():
            if r.get(key) is not None:
                ax.axhline(100 * r[key], linestyle=styles.get(name.split(",")[0], "-."), color="grey", linewidth=1)
                ax.annotate(name, (0, 100 * r[key]), fontsize=7, color="grey", va="bottom")
        ax.set_xticks(range(max(len(v["top1"]) for v in results["variants"].values())))
        ax.set_xlabel("generation (0 = teacher)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Noisy Student on Fashion-MNIST, {results['labels_per_class']} labels/class, "
                 f"{len(results.get('seeds', [0]))} seed(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_seed(args: argparse.Namespace, idx: Path, out: Path, env: dict[str, str], seed: int,
             selected: set[str]) -> dict[str, Any]:
    """Every selected variant and reference at ``training.seed = seed``; all seeds share one artifact root
    (the prepared data is one stage for all of them) and ``-s<seed>`` names (none for seed 0)."""
    suffix = f"-s{seed}" if seed else ""
    base = default_run(args, idx)
    spec = base["spec"]
    spec["training"]["seed"] = seed
    base["metadata"]["name"] += suffix
    default_prefix = prefix_dir(out, base)
    seconds: dict[str, float] = {}

    # default run: teacher + three noisy students
    seconds["default"] = run_pipeline(base, out, env)
    teacher_config = json.loads(stage_file(run_status(default_prefix)["generations"][0], "config.json").read_text())
    student_metrics = generation_metrics(default_prefix)

    # references through the train workload
    references: dict[str, Any] = {}
    if "references" in selected:
        plain = {**teacher_config, "noise": {"rand_augment": None, "dropout": 0.0, "stochastic_depth": 0.0}}
        m, seconds["teacher-plain"] = run_direct("teacher-plain" + suffix, plain, out, env)
        references["teacher without noise"] = {"top1": m.get("test_top1", m["top1"]),
                                               "corruption_top1": m.get("corruption_top1"),
                                               "epochs": m["epochs"]}
        all_data = out / "supervised-data"
        if not (all_data / "_DONE.json").exists():
            prep = spec["data"]["prepare"]
            run_logged([sys.executable, "-m", "noisy_student_workloads.data", "pack", "--source", "fashion-mnist",
                        "--path", str(idx), "--labels-per-class", str(ALL_LABELS_PER_CLASS), "--seed",
                        str(prep["seed"]), "--shard-size", str(prep["shardSize"]), "--output", all_data.as_uri()],
                       out / "logs" / "supervised-data.log", env)
        batch, epochs = student_budget(spec, student_metrics[1]["pseudo_images"])
        biggest = max(student_metrics[1:], key=lambda m: m["parameters"])  # the bound of the largest student
        largest = biggest["model"]
        for noisy in (True, False):
            name = "supervised, noise" if noisy else "supervised, no noise"
            config = {**teacher_config, "model": largest, "model_args": biggest.get("model_args", {}),
                      "labeled": all_data.as_uri() + "/labeled-*.tar",
                      "batch_size": batch, "epochs": epochs, "warmup_epochs": 0}
            if not noisy:
                config["noise"] = plain["noise"]
            m, seconds[name] = run_direct(name.replace(", ", "-").replace(" ", "-") + suffix, config, out, env)
            references[name] = {"top1": m.get("test_top1", m["top1"]), "corruption_top1": m.get("corruption_top1"),
                                "model": largest,
                                "epochs": epochs, "batch_size": batch, "labeled_images": m["labeled_images"]}

    def variant(change: str, found: list[dict[str, Any]]) -> dict[str, Any]:
        # report the test split (nothing was chosen by it); validation is what the recipe was tuned on
        return {"change": change, "top1": [g.get("test_top1", g["top1"]) for g in found],
                "validation_top1": [g["top1"] for g in found],
                "corruption_top1": [g.get("corruption_top1") for g in found],
                "pseudo_images": [g.get("pseudo_images", 0) for g in found]}

    variants = {"default": variant("—", student_metrics)}
    for name, (change, _) in ABLATIONS.items():
        if name not in selected:
            continue
        run = variant_run(base, name)
        run["metadata"]["name"] = f"fashion-mnist-{name}{suffix}"
        seconds[name] = run_pipeline(run, out, env)
        variants[name] = {**variant(change, generation_metrics(prefix_dir(out, run))),
                          "shared": reused_stages(prefix_dir(out, run))}
    return {"seed": seed, "run_file": base, "variants": variants, "references": references,
            "job_seconds": {k: round(v, 1) for k, v in seconds.items()}}


def mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None from one value) of the values that exist."""
    found = [v for v in values if v is not None]
    if not found:
        return None, None
    return statistics.fmean(found), statistics.stdev(found) if len(found) > 1 else None


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Per cell (variant × generation, reference): the mean over seeds, with ``*_sd`` beside it."""
    first = per_seed[0]
    variants: dict[str, Any] = {}
    for name, v in first["variants"].items():
        runs = [r["variants"][name] for r in per_seed]
        cell = {"change": v["change"]}
        for key in ("top1", "corruption_top1"):
            stats = [mean_sd([r[key][g] if g < len(r[key]) else None for r in runs]) for g in range(len(v["top1"]))]
            cell[key], cell[f"{key}_sd"] = [m for m, _ in stats], [sd for _, sd in stats]
        variants[name] = cell
    references: dict[str, Any] = {}
    for name, ref in first["references"].items():
        cell = {k: v for k, v in ref.items() if k not in ("top1", "corruption_top1")}
        for key in ("top1", "corruption_top1"):
            cell[key], cell[f"{key}_sd"] = mean_sd([r["references"][name].get(key) for r in per_seed])
        references[name] = cell
    teacher = variants["default"]["top1"][0]
    best = max(variants["default"]["top1"][1:])
    supervised = max((r["top1"] for k, r in references.items() if k.startswith("supervised")), default=None)
    plain_teacher = references.get("teacher without noise", {}).get("top1")

    def gap(t: float | None) -> float | None:
        return None if supervised is None or t is None or supervised <= t else (best - t) / (supervised - t)

    return {"seeds": [r["seed"] for r in per_seed], "variants": variants, "references": references,
            "supervised_top1": supervised,
            "gap_closed": {"noisy_teacher": gap(teacher), "plain_teacher": gap(plain_teacher)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test (10-15 min on two CPU cores): short budgets, 1,000 pseudo labels per class")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "efficacy", help="output directory")
    parser.add_argument("--labels-per-class", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=1,
                        help="training seeds 0..N-1; cells show mean ± standard deviation over them")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--scale-epochs", type=float, default=1.0, help="multiply every epoch count (GPU budgets)")
    parser.add_argument("--data", help="directory of the Fashion-MNIST IDX files")
    parser.add_argument("--only", nargs="*", help="what to run besides the default run: references and/or ablation names (default: all)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")

    idx = locate_idx(args.data)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = child_env(args.device)
    selected = set(args.only or ["default", "references", *ABLATIONS])
    started = time.perf_counter()
    per_seed = [run_seed(args, idx, out, env, seed, selected) for seed in range(args.seeds)]
    results = {
        "dataset": "fashion-mnist",
        "labels_per_class": args.labels_per_class,
        "quick": args.quick,
        "device": args.device,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.node()}",
        "wall_seconds": round(time.perf_counter() - started, 1),
        "run_file": per_seed[0]["run_file"],
        **summarise(per_seed),
        "per_seed": per_seed,
    }
    results["checks"] = checks(results)
    results["ablations"] = ablation_effects(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    table = render_table(results)
    (out / "results.md").write_text(table)
    plot(results, out / "efficacy.png")
    sys.stdout.write(table + f"\nwall time {results['wall_seconds'] / 60:.1f} min; outputs in {out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
