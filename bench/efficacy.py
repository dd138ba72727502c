"""Does Noisy Student learn? Fashion-MNIST efficacy benchmark with ablations.

Runs ``examples/fashion-mnist.yaml`` (a teacher on 100 labels per class;
6,000 training images held out for validation, the other 53,000 unlabeled;
three noisy student generations) through the local runner, then, each one
change from that default run:

* ``no-noise``: students without RandAugment, dropout or stochastic depth, for
  as many generations as the default run (each labeled by the one before);
* ``hard``: hard (argmax) pseudo labels instead of soft ones;
* ``no-balance``: filtered pseudo labels kept as they are, no class balancing;
* ``no-filter``: confidence threshold 0 (balancing still keeps the most
  confident images of over-full classes).

The other ablations train one student generation (compare with the default's
first); ``no-noise`` is compared at its first and its last generation.
Every run writes under one artifact root, so the stages an ablation would
redo identically have the same stage keys as the default run's and are
reused, not recomputed (see docs/stage-keys.md): the prepared data, the
teacher and its pseudo labels always, the first balanced manifest for ``hard``
and ``no-noise`` (whose students alone drop the noise; the teacher keeps it).

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
as helping or hurting only when its difference from the default's student of
the same generation exceeds the seeds' spread (the larger standard deviation
of the two).

The results end with the benchmark's checks: every student generation at or
above the previous one, the last student without noise below the default's
last by more than the spread, and a gap closed of at least 50 %.

Output in ``--out`` (default ``bench/out/efficacy``): ``results.json``,
``results.md`` (a Markdown table: top-1 on the 10,000 test images, which
nothing is tuned on, per generation for every variant, and *gap closed* = (best student − teacher) / (supervised − teacher)),
``efficacy.png``, and one log per job under ``logs/``. Rerunning resumes: every
finished stage is kept. Seeds are fixed (``training.seed``, the split seed).

Jobs run side by side (``--jobs``; on a CPU one per core by default), each pinned to cores of its own,
and each starts as soon as what it needs is done: the teacher without noise once the default run's
teacher is, the ablations once its first pseudo labels are balanced, the supervised references once it
ends, a later seed's default run once the data is prepared. These small models do not scale across
threads: on two cores, two one-core jobs train about 1.7× the images per second of one two-core job.
One invocation runs on a machine at a time (a second one exits naming the first): each splits all
the cores among its own jobs.

Budgets: the default is sized for two CPU cores; ``--quick`` trains a
40-epoch teacher and 3-epoch students on 1,000 pseudo labels per class (a
smoke test: its students are too short to beat the teacher). On a GPU use
``--device cuda`` and ``--scale-epochs`` (multiplies every epoch count); see
the README's "Does it learn?" section.

    python bench/efficacy.py --quick
    python bench/efficacy.py --out /tmp/efficacy --seeds 3
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import fcntl
import hashlib
import heapq
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
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

def without_noise(spec: dict[str, Any]) -> None:
    for student in spec["students"]:
        student["noise"] = {"randAugment": None, "dropout": 0.0, "stochasticDepth": 0.0}


# name -> (what changes, spec edit, whether it keeps every student generation); what an ablation shares
# with the default run follows from stage keys. The students without noise iterate as the default's do:
# the paper's claim is that noise is what lets each student end above its teacher, so the generations
# go on climbing; one generation cannot show that (README, "Does it learn?").
ABLATIONS: dict[str, tuple[str, Callable[[dict[str, Any]], None], bool]] = {
    "no-noise": ("students without RandAugment, dropout, stochastic depth", without_noise, True),
    "hard": ("hard pseudo labels", lambda s: s["pseudoLabels"].update(type="hard"), False),
    "no-balance": ("no class balancing", lambda s: s["pseudoLabels"].update(balance=False), False),
    "no-filter": ("confidence threshold 0", lambda s: s["pseudoLabels"].update(confidenceThreshold=0.0), False),
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
    _, edit, every_generation = ABLATIONS[name]
    if not every_generation:
        spec["students"] = spec["students"][:1]
    edit(spec)
    return run


def prefix_dir(out: Path, run: dict[str, Any]) -> Path:
    meta = run["metadata"]
    return out / "runs" / meta.get("namespace", "default") / meta["name"]


def child_env(device: str) -> dict[str, str]:
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


#: Replaces the process by ``argv[2:]`` pinned to the cores listed in ``argv[1]`` (its children inherit them).
PIN = "import os, sys; os.sched_setaffinity(0, map(int, sys.argv[1].split(','))); os.execvp(sys.argv[2], sys.argv[2:])"


def available_cores() -> set[int]:
    return os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def pinned(cmd: list[str], cores: list[int] | None) -> list[str]:
    """``cmd`` run on ``cores`` only (its children too); as it is without them, or where the platform cannot
    pin (macOS: side-by-side jobs then share the cores, which the workloads divide among themselves)."""
    if cores is None or not hasattr(os, "sched_setaffinity"):
        return cmd
    return [sys.executable, "-c", PIN, ",".join(map(str, cores)), *cmd]


#: Held by the running invocation: each one splits all of this machine's cores among its own jobs, so two
#: at once would pin two jobs to each core (and time neither honestly).
LOCK = Path(tempfile.gettempdir()) / "noisy-student-efficacy.lock"


@contextlib.contextmanager
def sole_invocation(out: Path, lock: Path = LOCK) -> Iterator[None]:
    """Hold ``lock`` while writing to ``out``; exits naming the holder when another invocation has it.

    The lock is the machine's, so whoever creates it leaves it writable for every user; one this user
    cannot write (another's umask) is still locked, read-only (``flock`` needs no more), holder unwritten."""
    try:
        fd, writable = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666), True
        with contextlib.suppress(PermissionError):  # the umask's share; only the owner may change it
            os.fchmod(fd, 0o666)
    except PermissionError:
        fd, writable = os.open(lock, os.O_RDONLY), False
    with open(fd, "r+" if writable else "r") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SystemExit(f"another bench/efficacy.py is running on this machine ({f.read().strip() or 'unknown'}; "
                             f"lock {lock}): it pins its jobs to every core, so wait for it to end") from None
        if writable:
            f.truncate(0)
            f.write(f"pid {os.getpid()}, --out {out}")
            f.flush()
        try:
            yield
        finally:
            if writable:
                f.truncate(0)


def split_cores(cores: list[int], jobs: int) -> list[list[int]]:
    """``jobs`` disjoint, contiguous sets of ``cores`` (at most one per core)."""
    cores = sorted(cores)
    jobs = max(1, min(jobs, len(cores)))
    return [cores[i * len(cores) // jobs:(i + 1) * len(cores) // jobs] for i in range(jobs)]


def run_logged(cmd: list[str], log: Path, env: dict[str, str], cores: list[int] | None = None) -> float:
    """Run ``cmd`` (on ``cores`` only, when given) with its output in ``log``; returns wall seconds, exits on
    failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = pinned(cmd, cores)
    tic = time.perf_counter()
    with log.open("a") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({code}); log {log}:\n{tail}")
    return time.perf_counter() - tic


def run_pipeline(run: dict[str, Any], out: Path, env: dict[str, str], cores: list[int] | None = None) -> float:
    """One run file through ``noisy-student run``; stages with a marker under their key are reused."""
    run_file = out / "runfiles" / f"{run['metadata']['name']}.yaml"
    run_file.parent.mkdir(parents=True, exist_ok=True)
    run_file.write_text(yaml.safe_dump(run, sort_keys=False))
    cli = shutil.which("noisy-student", path=str(Path(sys.executable).parent)) or "noisy-student"
    return run_logged([cli, "run", str(run_file), "--artifacts", (out / "runs").as_uri(), "--output", "json"],
                      out / "logs" / f"{run['metadata']['name']}.log", env, cores)


def run_direct(name: str, config: dict[str, Any], out: Path, env: dict[str, str],
               cores: list[int] | None = None) -> tuple[dict[str, Any], float]:
    """A train workload outside any run (references), under a directory named by its configuration's
    digest, as a run's stages are: it resumes, and a finished one is skipped, only for the same
    configuration (a changed recipe never scores the old model), and one trained with another recipe
    is kept for when that recipe comes back."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
    stage = out / "direct" / name / digest
    config = {**config, "output": stage.as_uri() + "/"}
    given = stage / "input-config.json"
    seconds = 0.0
    if not (stage / "_DONE.json").exists():
        stage.mkdir(parents=True, exist_ok=True)
        given.write_text(json.dumps(config, indent=1))
        seconds = run_logged([sys.executable, "-m", "noisy_student_workloads.train", "--config",
                              (stage / "input-config.json").as_uri()], out / "logs" / f"{name}.log", env, cores)
    return json.loads((stage / "metrics.json").read_text()), seconds


class Slots:
    """Cores for jobs run side by side: ``jobs`` disjoint sets of this process's cores, one per running job.

    A workload process sizes its torch threads and data workers by the cores it may run on
    (``noisy_student_workloads.runtime``), so a job pinned to one core trains on one thread. On a CPU
    these small models do not scale across threads: two one-core jobs side by side train about 1.7×
    the images per second of one job on both cores (README, "Does it learn?"). A waiting job with a
    lower ``priority`` gets the next free set first (ties: the earlier request).
    """

    def __init__(self, jobs: int, cores: list[int] | None = None) -> None:
        self.sets = split_cores(list(cores if cores is not None else available_cores()), jobs)
        self._free = list(self.sets)
        self._waiting: list[tuple[int, int]] = []
        self._tickets = itertools.count()
        self._cv = threading.Condition()

    @contextlib.contextmanager
    def cores(self, priority: int) -> Iterator[list[int]]:
        with self._cv:
            ticket = (priority, next(self._tickets))
            heapq.heappush(self._waiting, ticket)
            self._cv.wait_for(lambda: bool(self._free) and self._waiting[0] == ticket)
            heapq.heappop(self._waiting)
            cores = self._free.pop(0)
            self._cv.notify_all()
        try:
            yield cores
        finally:
            with self._cv:
                self._free.append(cores)
                self._cv.notify_all()


class Jobs:
    """The benchmark's jobs, each in a thread: it waits for the futures it needs, then for free cores
    (:class:`Slots`), then runs. A failed dependency fails the jobs that wait for it; the others run to
    their end (what they finish is kept: a rerun resumes from it)."""

    #: priorities: the default run (the critical path) first, then what waits on it the least; of the
    #: ablations, the one that iterates (the longest) before those of one generation
    DEFAULT, DATA, TEACHER_PLAIN, ITERATED_ABLATION, ABLATION, SUPERVISED = range(6)

    def __init__(self, slots: Slots) -> None:
        self.slots = slots
        # every job waits in a thread of its own: a smaller pool could queue a job behind the ones waiting for it
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1024, thread_name_prefix="job")
        self.seconds: dict[str, float] = {}

    def submit(self, name: str, priority: int, fn: Callable[[list[int]], Any],
               after: tuple[concurrent.futures.Future, ...] = ()) -> concurrent.futures.Future:
        def job() -> Any:
            for dependency in after:
                dependency.result()
            with self.slots.cores(priority) as cores:
                tic = time.perf_counter()
                value = fn(cores)
                self.seconds[name] = time.perf_counter() - tic
                return value

        return self.pool.submit(job)

    def when(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """``fn`` in a thread of its own, holding no cores (a wait)."""
        return self.pool.submit(fn)


def wait_for_stage(prefix: Path, stage: str, generation: int, run: concurrent.futures.Future,
                   poll_seconds: float = 5.0) -> None:
    """Block until the run writing ``prefix`` has the stage done (its status says Complete or Reused);
    raise if the run ends without it. While the run goes on, a status written before this call (by an
    earlier invocation, maybe of another spec) is not believed; once it has ended, what is there is its
    status (a rerun that finds every stage done does not write it again)."""
    status, not_before = prefix / "status.json", time.time()

    def done(ended: bool = False) -> bool:
        try:
            if not ended and status.stat().st_mtime < not_before:
                return False
            stages = json.loads(status.read_text())["stages"]
        except (OSError, ValueError, KeyError):
            return False
        return any(s["stage"] == stage and s["generation"] == generation and s["state"] in ("Complete", "Reused")
                   for s in stages)

    while not done():
        if run.done():
            run.result()  # its error, if it failed
            if not done(ended=True):
                raise SystemExit(f"{prefix}: the run ended without its {stage} stage of generation {generation}")
            return
        time.sleep(poll_seconds)


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


def against_default(results: dict[str, Any], name: str, generation: int) -> tuple[float, float]:
    """A variant's student of ``generation`` minus the default's, and the seeds' spread of the two cells."""
    return (results["variants"][name]["top1"][generation] - results["variants"]["default"]["top1"][generation],
            spread(results, "default", name, generation))


def last_common_generation(results: dict[str, Any], name: str) -> int:
    """The last generation a variant and the default run both trained."""
    return min(len(results["variants"][v]["top1"]) for v in ("default", name)) - 1


def checks(results: dict[str, Any]) -> dict[str, bool | None]:
    """What the default run must show: each generation at or above the previous one, noise worth
    having (the students without noise, iterated as many generations, end below the default's last
    student by more than the seeds' spread), and the gap-closed goal. ``None`` where the variant needed
    was not run."""
    default = results["variants"]["default"]["top1"]
    no_noise = results["variants"].get("no-noise", {}).get("top1", [])
    gap = results["gap_closed"]["noisy_teacher"]
    noise_helps = None
    if len(no_noise) > 1 and len(default) > 1:
        difference, sd = against_default(results, "no-noise", last_common_generation(results, "no-noise"))
        noise_helps = -difference > sd
    return {
        "generations_monotone": all(b >= a for a, b in zip(default, default[1:])),
        "noise_helps": noise_helps,
        "gap_closed_goal": gap >= GAP_GOAL if gap is not None else None,
    }


def ablation_effects(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Each ablation's students against the default's of the same generation — the first, and the last
    when it iterates further — the difference, the seeds' spread, and whether the change hurts or helps:
    only when the difference exceeds the spread (one seed: no spread to judge)."""
    default = results["variants"]["default"]["top1"]
    one_seed = len(results.get("seeds", [0])) < 2
    effects = {}
    for name, v in results["variants"].items():
        if name == "default" or len(v["top1"]) < 2 or len(default) < 2:
            continue
        compared = []
        for generation in sorted({1, last_common_generation(results, name)}):
            diff, sd = against_default(results, name, generation)
            verdict = ("one seed" if one_seed else
                       "hurts" if diff < -sd else "helps" if diff > sd else "within the spread")
            compared.append({"generation": generation, "difference": diff, "spread": sd, "verdict": verdict})
        effects[name] = compared
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
        lines += ["", "Ablations against the default's student of the same generation (a change counts only "
                  "beyond the seeds' spread, the larger standard deviation of the two cells): " + "; ".join(
                      f"{name}, student {e['generation']}: {100 * e['difference']:+.1f} "
                      f"(spread {100 * e['spread']:.1f}): {e['verdict']}"
                      for name, compared in effects.items() for e in compared) + "."]
    verdict = {True: "yes", False: "**no**", None: "not run"}
    c = results["checks"]
    lines += [
        "",
        f"Checks: every generation at or above the previous one: {verdict[c['generations_monotone']]}; "
        f"the last student without noise below the default's by more than the spread: {verdict[c['noise_helps']]}; "
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


def pack_supervised_data(idx: Path, out: Path, spec: dict[str, Any], env: dict[str, str],
                         cores: list[int] | None = None) -> Path:
    """Every training label but validation's, for the supervised references (packed once, for all seeds)."""
    all_data = out / "supervised-data"
    if not (all_data / "_DONE.json").exists():
        prep = spec["data"]["prepare"]
        run_logged([sys.executable, "-m", "noisy_student_workloads.data", "pack", "--source", "fashion-mnist",
                    "--path", str(idx), "--labels-per-class", str(ALL_LABELS_PER_CLASS), "--seed",
                    str(prep["seed"]), "--shard-size", str(prep["shardSize"]), "--output", all_data.as_uri()],
                   out / "logs" / "supervised-data.log", env, cores)
    return all_data


def schedule_seed(jobs: Jobs, args: argparse.Namespace, idx: Path, out: Path, env: dict[str, str], seed: int,
                  selected: set[str], data: concurrent.futures.Future | None,
                  prepared: concurrent.futures.Future | None) -> tuple[concurrent.futures.Future,
                                                                       concurrent.futures.Future]:
    """Every selected variant and reference at ``training.seed = seed``, as jobs; all seeds share one artifact
    root (the prepared data is one stage for all of them) and ``-s<seed>`` names (none for seed 0).

    Each job starts as soon as what it needs is done: the teacher without noise once the default run's
    teacher is (it copies that teacher's configuration), the ablations once its first pseudo labels are
    balanced (they reuse every stage before that), the supervised references once the default run ends
    (their budget is its longest student's), a later seed's default run once the data is prepared
    (``prepared``; ``data`` is the supervised references' data). Returns the seed's results and the
    wait for the prepared data (``prepared``, else this seed's prepare stage), as futures."""
    suffix = f"-s{seed}" if seed else ""
    base = default_run(args, idx)
    spec = base["spec"]
    spec["training"]["seed"] = seed
    base["metadata"]["name"] += suffix
    default_prefix = prefix_dir(out, base)
    label = f"seed {seed}: " if args.seeds > 1 else ""

    # default run: teacher + three noisy students
    default = jobs.submit(f"{label}default", Jobs.DEFAULT, lambda cores: run_pipeline(base, out, env, cores),
                          after=(prepared,) if prepared else ())
    teacher_done = jobs.when(lambda: wait_for_stage(default_prefix, "teacher", 0, default))
    labels_done = jobs.when(lambda: wait_for_stage(default_prefix, "balance", 1, default))
    prepare_done = prepared or jobs.when(lambda: wait_for_stage(default_prefix, "prepare", 0, default))

    def teacher_config() -> dict[str, Any]:
        return json.loads(stage_file(run_status(default_prefix)["generations"][0], "config.json").read_text())

    plain_noise = {"rand_augment": None, "dropout": 0.0, "stochastic_depth": 0.0}
    references: dict[str, concurrent.futures.Future] = {}
    if "references" in selected:
        def plain(cores: list[int]) -> dict[str, Any]:
            m, _ = run_direct("teacher-plain" + suffix, {**teacher_config(), "noise": plain_noise}, out, env, cores)
            return {"top1": m.get("test_top1", m["top1"]), "corruption_top1": m.get("corruption_top1"),
                    "epochs": m["epochs"]}

        references["teacher without noise"] = jobs.submit(f"{label}teacher-plain", Jobs.TEACHER_PLAIN, plain,
                                                          after=(teacher_done,))

        def supervised(noisy: bool, name: str) -> Callable[[list[int]], dict[str, Any]]:
            def train(cores: list[int]) -> dict[str, Any]:
                student_metrics = generation_metrics(default_prefix)
                batch, epochs = student_budget(spec, student_metrics[1]["pseudo_images"])
                biggest = max(student_metrics[1:], key=lambda m: m["parameters"])  # the bound of the largest student
                config = {**teacher_config(), "model": biggest["model"], "model_args": biggest.get("model_args", {}),
                          "labeled": data.result().as_uri() + "/labeled-*.tar",
                          "batch_size": batch, "epochs": epochs, "warmup_epochs": 0}
                if not noisy:
                    config["noise"] = plain_noise
                m, _ = run_direct(name.replace(", ", "-").replace(" ", "-") + suffix, config, out, env, cores)
                return {"top1": m.get("test_top1", m["top1"]), "corruption_top1": m.get("corruption_top1"),
                        "model": biggest["model"], "epochs": epochs, "batch_size": batch,
                        "labeled_images": m["labeled_images"]}
            return train

        for noisy in (True, False):
            name = "supervised, noise" if noisy else "supervised, no noise"
            references[name] = jobs.submit(f"{label}{name}", Jobs.SUPERVISED, supervised(noisy, name),
                                           after=(default, data))

    def variant(change: str, found: list[dict[str, Any]]) -> dict[str, Any]:
        # report the test split (nothing was chosen by it); validation is what the recipe was tuned on
        return {"change": change, "top1": [g.get("test_top1", g["top1"]) for g in found],
                "validation_top1": [g["top1"] for g in found],
                "corruption_top1": [g.get("corruption_top1") for g in found],
                "pseudo_images": [g.get("pseudo_images", 0) for g in found]}

    ablations: dict[str, concurrent.futures.Future] = {}
    for name, (change, _, every_generation) in ABLATIONS.items():
        if name not in selected:
            continue
        run = variant_run(base, name)
        run["metadata"]["name"] = f"fashion-mnist-{name}{suffix}"

        def ablate(cores: list[int], run: dict[str, Any] = run, change: str = change) -> dict[str, Any]:
            run_pipeline(run, out, env, cores)
            return {**variant(change, generation_metrics(prefix_dir(out, run))),
                    "shared": reused_stages(prefix_dir(out, run))}

        priority = Jobs.ITERATED_ABLATION if every_generation else Jobs.ABLATION
        ablations[name] = jobs.submit(f"{label}{name}", priority, ablate, after=(labels_done,))

    def results() -> dict[str, Any]:
        default.result()
        variants = {"default": variant("—", generation_metrics(default_prefix))}
        variants.update({name: f.result() for name, f in ablations.items()})
        return {"seed": seed, "run_file": base, "variants": variants,
                "references": {name: f.result() for name, f in references.items()}}

    return jobs.when(results), prepare_done


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
    parser.add_argument("--jobs", type=int, default=0,
                        help="jobs side by side, each pinned to its share of the cores (default: one per core, at "
                             "most 8, on a CPU; 1 with --device cuda)")
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
    with sole_invocation(out):
        out.mkdir(parents=True, exist_ok=True)
        env = child_env(args.device)
        selected = set(args.only or ["default", "references", *ABLATIONS])
        slots = Slots(args.jobs if args.jobs else 1 if args.device == "cuda" else min(len(available_cores()), 8))
        jobs = Jobs(slots)
        started = time.perf_counter()
        data = (jobs.submit("supervised-data", Jobs.DATA,
                            lambda cores: pack_supervised_data(idx, out, default_run(args, idx)["spec"], env, cores))
                if "references" in selected else None)
        scheduled, prepared = [], None
        for seed in range(args.seeds):
            seed_results, prepared = schedule_seed(jobs, args, idx, out, env, seed, selected, data, prepared)
            scheduled.append(seed_results)  # later seeds wait for seed 0's data, then share it
        per_seed = [f.result() for f in scheduled]
        results = {
            "dataset": "fashion-mnist",
            "labels_per_class": args.labels_per_class,
            "quick": args.quick,
            "device": args.device,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.node()}",
            "wall_seconds": round(time.perf_counter() - started, 1),
            "jobs_side_by_side": len(slots.sets),
            "job_seconds": {k: round(v, 1) for k, v in jobs.seconds.items()},
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
