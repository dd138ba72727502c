"""The quickstart's stage times on this checkout against an older commit's, side by side — a benchmark, not a test.

It checks ``--before`` out into a temporary ``git worktree`` (default
``7a615b9^``: the last commit before the workloads streamed their data,
issue 12's first change), then starts ``noisy-student run
examples/quickstart.yaml -o json`` from both trees at the same moment on
this machine, each with its own artifacts directory and its own
``operator/`` and ``workloads/`` first on ``PYTHONPATH`` (the stages, TorchX
``local_cwd`` processes, inherit it). Both runs share the cores while both
run; the one that finishes first leaves the other the machine. It prints
each stage kind's time (its jobs' submitted → finished, summed), their sum,
each run's wall time, the ratios after / before, and the host's load
average (1 min) sampled while they ran.

Command line::

    nice python bench/quickstart.py --before '7a615b9^'
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def start(tree: Path, artifacts: Path, out: Path) -> subprocess.Popen[bytes]:
    """``noisy-student run`` of ``tree``'s quickstart with ``tree``'s sources first on the path; its final status
    goes to ``out``.json, its log to ``out``.log."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "operator"), str(tree / "workloads")])}
    cmd = [sys.executable, "-m", "noisy_student_operator.cli", "run", str(tree / "examples/quickstart.yaml"),
           "--artifacts", f"file://{artifacts}/", "--output", "json"]
    with out.with_suffix(".json").open("w") as stdout, out.with_suffix(".log").open("w") as stderr:
        return subprocess.Popen(cmd, cwd=tree, env=env, stdout=stdout, stderr=stderr)


def stage_seconds(status: dict) -> dict[str, float]:
    """Seconds per stage kind: its jobs' submitted → finished, summed (every attempt)."""
    out: dict[str, float] = defaultdict(float)
    for job in status.get("jobs", []):
        if job.get("submittedAt") and job.get("finishedAt"):
            span = datetime.fromisoformat(job["finishedAt"]) - datetime.fromisoformat(job["submittedAt"])
            out[job["stage"]] += span.total_seconds()
    return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="7a615b9^", help="the commit to compare this checkout with")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ns-quickstart-"))
    old = work / "before"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.before], check=True,
                   capture_output=True)
    commits = {name: subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], check=True,
                                    capture_output=True, text=True).stdout.strip()
               for name, tree in (("before", old), ("after", REPO))}
    try:
        tic = time.perf_counter()
        runs = {name: start(tree, work / f"artifacts-{name}", work / name)
                for name, tree in (("before", old), ("after", REPO))}
        wall, loads = {}, []
        while len(wall) < len(runs):
            for name, proc in runs.items():
                if name not in wall and proc.poll() is not None:
                    wall[name] = time.perf_counter() - tic
            loads.append(os.getloadavg()[0])
            time.sleep(1)
        statuses = {}
        for name, proc in runs.items():
            if proc.returncode != 0:
                sys.exit(f"the {name} run failed ({proc.returncode}); see {work / f'{name}.log'}")
            statuses[name] = json.loads((work / f"{name}.json").read_text())
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], check=False)
    seconds = {name: stage_seconds(s) for name, s in statuses.items()}
    print(f"quickstart, both runs started together on {os.cpu_count()} CPUs: before {commits['before']}, "
          f"after {commits['after']} (this checkout)")
    print(f"{'stage':>10} {'before s':>9} {'after s':>8} {'after/before':>13}")
    for stage in dict.fromkeys([*seconds["before"], *seconds["after"]]):  # in the order they ran
        b, a = seconds["before"].get(stage, 0.0), seconds["after"].get(stage, 0.0)
        print(f"{stage:>10} {b:9.0f} {a:8.0f} {a / b if b else float('nan'):13.2f}")
    total = {name: sum(s.values()) for name, s in seconds.items()}
    print(f"{'sum':>10} {total['before']:9.0f} {total['after']:8.0f} {total['after'] / total['before']:13.2f}")
    print(f"{'wall':>10} {wall['before']:9.0f} {wall['after']:8.0f} {wall['after'] / wall['before']:13.2f}")
    print(f"host load average (1 min) while they ran: mean {sum(loads) / len(loads):.1f}, max {max(loads):.1f}")
    print("top-1 per generation: " + "; ".join(
        f"{name} " + ", ".join(f"{g.get('top1', float('nan')):.3f}" for g in s.get("generations", []))
        for name, s in statuses.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"commits": commits, "seconds": seconds, "wall": wall,
                                               "load_mean": sum(loads) / len(loads), "load_max": max(loads)},
                                              indent=2))


if __name__ == "__main__":
    main()
