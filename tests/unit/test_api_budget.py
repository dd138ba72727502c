"""What the operator asks of the API server: the Job watch filtered on the server, hints debounced."""

import asyncio
import platform
import subprocess
import sys
import threading
import time

import kopf
import pytest

from noisy_student_operator import handlers
from noisy_student_operator.handlers import JOB_SELECTOR, Requeuer


def test_the_volcano_job_watch_is_filtered_by_label_on_the_server():
    """kopf sends `settings.watching.label_selectors` as `labelSelector` of the list and the watch."""
    from kopf._cogs.structs.references import Resource

    settings = kopf.OperatorSettings()
    handlers.on_startup(settings)
    jobs = Resource("batch.volcano.sh", "v1alpha1", "jobs")
    runs = Resource("noisystudent.dev", "v1alpha1", "noisystudentruns")
    assert list(settings.watching.label_selectors.collect(jobs)) == [JOB_SELECTOR]
    assert JOB_SELECTOR == "app.kubernetes.io/managed-by=noisy-student-operator"
    assert list(settings.watching.label_selectors.collect(runs)) == []  # every run is ours


def test_a_burst_of_job_changes_is_one_pass_per_run():
    passes = []
    fired = threading.Event()

    def callback(namespace, name):
        passes.append((namespace, name))
        fired.set()

    hints = Requeuer(callback)
    for _ in range(64):  # a label stage's 64 shards starting
        hints.hint("ml", "a", 0.2)
    hints.hint("ml", "b", 0.2)
    assert fired.wait(10)
    deadline = time.monotonic() + 10
    while len(passes) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert sorted(passes) == [("ml", "a"), ("ml", "b")]
    hints.hint("ml", "a", 0.01)  # a change after the pass gets a pass of its own
    deadline = time.monotonic() + 10
    while len(passes) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert passes[-1] == ("ml", "a")


def test_a_hint_never_postpones_a_pending_pass():
    fired = threading.Event()
    hints = Requeuer(lambda namespace, name: fired.set())
    hints.hint("ml", "a", 0.05)
    hints.hint("ml", "a", 30.0)
    assert fired.wait(5)


def test_the_operators_s3_calls_fail_fast_and_a_pass_has_a_deadline(monkeypatch):
    """botocore's defaults (8 attempts, 60 s reads) let one slow store hold a pass for minutes."""
    from noisy_student_operator.operator_main import PASS_DEADLINE, marker_reader

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    reader = marker_reader()
    config = reader.store_for("s3://bucket/runs/").client.meta.config
    assert (config.connect_timeout, config.read_timeout) == (2.0, 5.0)
    assert config.retries["total_max_attempts"] == 2
    assert config.max_pool_connections == handlers.MAX_WORKERS + handlers.HINT_WORKERS  # botocore keeps 10
    assert reader.deadline == PASS_DEADLINE <= 10
    assert reader.store_for("file:///tmp/x/") is not reader.store_for("s3://bucket/runs/")


def test_pending_passes_of_many_runs_use_one_scheduler_thread_and_the_bounded_pool():
    """A thousand runs' hints and requeues: one scheduler thread, passes on kopf's pool (its
    max_workers), never a timer thread per run; every run still gets its one debounced pass."""
    from concurrent.futures import ThreadPoolExecutor

    workers = 4
    release = threading.Event()
    lock = threading.Lock()
    running, most, passes = [0], [0], []

    def callback(namespace, name):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        release.wait(10)
        with lock:
            running[0] -= 1
            passes.append(name)

    threads_before = threading.active_count()
    hints = Requeuer(callback, ThreadPoolExecutor(max_workers=workers))
    runs = [f"run-{i}" for i in range(1000)]
    for name in runs:
        for _ in range(3):  # a burst of Job changes per run
            hints.hint("ml", name, 0.05)
    deadline = time.monotonic() + 10
    while most[0] < workers and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() - threads_before <= 1 + workers
    release.set()
    deadline = time.monotonic() + 30
    while len(passes) < len(runs) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert sorted(passes) == sorted(runs)  # one pass per run: its three hints joined
    assert most[0] == workers and hints.pending() == 0


def job_event(**kwargs):
    """kopf runs the Job event handler on its event loop (it is a coroutine)."""
    asyncio.run(handlers.on_job_event(**kwargs))


def test_kopf_startup_hands_its_worker_pool_to_requeued_passes_and_hinted_passes_get_their_own():
    from noisy_student_operator.controller import RunController

    kopf_registry = kopf.OperatorRegistry()
    previous = kopf.get_default_registry()
    kopf.set_default_registry(kopf_registry)
    try:
        handlers.register(RunController(runs_api=None, backends={}))
        settings = kopf.OperatorSettings()
        handlers.on_startup(settings)
        assert handlers._requeues.executor is settings.execution.executor
        assert settings.execution.max_workers == handlers.MAX_WORKERS
        assert handlers._hints.executor is not settings.execution.executor
        assert handlers._hints.executor._max_workers == handlers.HINT_WORKERS
    finally:
        kopf.set_default_registry(previous)


def test_a_finished_jobs_pass_never_waits_behind_kopfs_busy_workers(monkeypatch):
    """At 1,000 runs kopf's workers had about a timer interval's worth of timer passes queued;
    a finished Job's event, then its run's pass, waited behind them (p95 53 s to the next job).
    The event is handled on kopf's event loop and the pass runs on the hints' own workers."""
    passed = threading.Event()

    class Controller:
        def job_changed(self, event_type, job):
            return True

        def job_ended(self, namespace, name):
            pass

        def reconcile(self, namespace, name, unless_idle=False, body=None):
            passed.set()

    monkeypatch.setattr(handlers, "_controller", Controller())
    settings = kopf.OperatorSettings()
    handlers.on_startup(settings)
    release = threading.Event()
    try:
        for _ in range(5 * handlers.MAX_WORKERS):  # kopf's pool: every worker busy, more queued
            settings.execution.executor.submit(release.wait, 30)
        job_event(namespace="ml", labels={"noisystudent.dev/run": "a"}, type="MODIFIED",
                  status={"state": {"phase": "Completed"}})
        assert passed.wait(10)
    finally:
        release.set()


def test_a_hint_due_sooner_brings_the_pending_pass_forward():
    fired = threading.Event()
    hints = Requeuer(lambda namespace, name: fired.set())
    hints.hint("ml", "a", 30.0)
    hints.hint("ml", "a", 0.01)
    assert fired.wait(5)


def test_a_job_that_ended_is_looked_at_at_once_other_changes_are_debounced(monkeypatch):
    hinted = []

    class Recorder:
        def hint(self, namespace, name, seconds):
            hinted.append((name, seconds))

    class Controller:  # the handoff from a job's end to the next submission is measured from here
        def job_ended(self, namespace, name):
            hinted.append((name, "ended"))

    monkeypatch.setattr(handlers, "_hints", Recorder())
    monkeypatch.setattr(handlers, "_controller", Controller())
    labels = {"noisystudent.dev/run": "a"}
    for phase in ("Pending", "Running", "Completing", "Completed", "Failed", "Aborted"):
        job_event(namespace="ml", labels=labels, type="MODIFIED", status={"state": {"phase": phase}})
    job_event(namespace="ml", labels=labels, type="DELETED", status={"state": {"phase": "Running"}})
    job_event(namespace="ml", labels=labels, type=None, status={})  # the initial listing
    delay, ended = handlers.HINT_DELAY, [("a", "ended"), ("a", 0.0)]
    assert hinted == [("a", delay), ("a", delay), ("a", delay), *ended * 4]


def finished_run(finished_at, removed_at=None, ttl=None):
    job = {"name": "j", "state": "Succeeded", "finishedAt": finished_at}
    if removed_at:
        job["removedAt"] = removed_at
    return {"metadata": {"namespace": "ml", "name": "a", "generation": 1},
            "spec": {"scheduler": {"ttlSecondsAfterFinished": ttl}} if ttl is not None else {},
            "status": {"observedGeneration": 1, "jobs": [job],
                       "conditions": [{"type": "Succeeded", "status": "True"}]}}


def test_at_start_a_finished_run_waiting_to_remove_its_jobs_is_requeued_without_a_request(monkeypatch):
    """Its removal is due in an hour: kopf's resume hands over the listed body; the pass is
    requeued for then, with no GET of the run, no observation, no timer."""
    import datetime as dt

    from noisy_student_operator.controller import RunController

    class NoApi:
        def get(self, namespace, name, cached=False):
            raise AssertionError("a request about a finished run at start")

    scheduled = []

    class Recorder:
        def schedule(self, namespace, name, seconds):
            scheduled.append((name, seconds))

    registry = kopf.OperatorRegistry()
    previous = kopf.get_default_registry()
    kopf.set_default_registry(registry)
    try:
        handlers.register(RunController(NoApi(), backends={}))
        monkeypatch.setattr(handlers, "_requeues", Recorder())
        now = dt.datetime.now(dt.timezone.utc)
        body = finished_run((now - dt.timedelta(minutes=1)).isoformat(), ttl=3660)
        assert not handlers.busy(body)  # no timer
        handlers.on_resume(namespace="ml", name="a", body=body)
        assert [name for name, _ in scheduled] == ["a"] and 3590 < scheduled[0][1] <= 3600
        removed = finished_run(now.isoformat(), removed_at=now.isoformat())
        assert not handlers.unsettled(removed) and not handlers.busy(removed)  # no resume, no timer
        due = finished_run((now - dt.timedelta(seconds=5)).isoformat(), ttl=0)
        assert handlers.busy(due)  # its removal is due: the timer (or the requeue) does it
    finally:
        kopf.set_default_registry(previous)


class CountingJobsApi:
    """`CustomObjectsApi` GETs over a dict of Volcano Jobs, each one recorded as read from the API
    server's watch cache (resourceVersion 0) or from etcd."""

    def __init__(self):
        self.jobs, self.reads = {}, []
        self.api_client = self

    @property
    def gets(self):
        return len(self.reads)

    def _get(self, namespace, name, source):
        from kubernetes.client.rest import ApiException

        self.reads.append(source)
        if (namespace, name) not in self.jobs:
            raise ApiException(status=404)
        return self.jobs[(namespace, name)]

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        return self._get(namespace, name, "etcd")

    def call_api(self, path, method, path_params, query_params, **_):
        assert method == "GET" and ("resourceVersion", "0") in query_params
        return self._get(path_params["namespace"], path_params["name"], "cache")


def volcano_job(name, phase, **meta):
    return {"metadata": {"name": name, "namespace": "ml", **meta}, "spec": {"queue": "default", "tasks": []},
            "status": {"state": {"phase": phase}}}


def test_a_watched_job_is_observed_without_a_get_and_read_again_after_a_minute():
    from noisy_student_operator.core.planner import JobState
    from noisy_student_operator.volcano import WATCHED_FOR, VolcanoJobs

    now = [0.0]
    jobs = VolcanoJobs(clock=lambda: now[0])
    jobs.objects = api = CountingJobsApi()
    api.jobs[("ml", "a")] = volcano_job("a", "Running")
    jobs.record(None, volcano_job("a", "Running"))  # listed when the watch started
    for _ in range(6):  # a pass every 10 s
        assert jobs.observe("ml", "a").state is JobState.RUNNING
        now[0] += 10
    assert api.gets == 0
    jobs.record("MODIFIED", volcano_job("a", "Completed"))
    assert jobs.observe("ml", "a").state is JobState.SUCCEEDED and api.gets == 0
    # Not shown by the watch for WATCHED_FOR seconds (a deletion missed while it reconnected): read,
    # from the watch cache; gone there, from etcd.
    del api.jobs[("ml", "a")]
    now[0] += WATCHED_FOR
    assert jobs.observe("ml", "a").state is JobState.MISSING and api.reads == ["cache", "etcd"]
    assert jobs.watched() == 0
    # Deleted on the watch: a GET says whether it is gone; a job the watch never showed is read.
    api.jobs[("ml", "b")] = volcano_job("b", "Pending")
    jobs.record("MODIFIED", volcano_job("b", "Running", deletionTimestamp="2026-01-01T00:00:00Z"))
    assert jobs.observe("ml", "b").state is JobState.RUNNING and api.gets == 2  # being deleted: running
    jobs.record("DELETED", volcano_job("b", "Running"))
    del api.jobs[("ml", "b")]
    assert jobs.observe("ml", "b").state is JobState.MISSING and api.gets == 4
    api.jobs[("ml", "c")] = volcano_job("c", "Running")
    assert jobs.observe("ml", "c").state is JobState.RUNNING and api.reads[4:] == ["cache"]
    assert jobs.observe("ml", "c").state is JobState.RUNNING and api.gets == 5  # the GET is kept too


def podgroup(phase):
    return {"status": {"phase": phase}}


class CountingCore:
    """`CoreV1Api` lists of a Job's pods and of its PodGroup's Events, each one recorded with the
    resourceVersion asked (\"0\": the watch cache), all of them empty. `held`: an Events list
    waits for it, as on an API server that takes seconds for one."""

    api_client = None

    class Listing:
        items = []

    def __init__(self, held=None):
        self.calls, self.held = [], held

    def list_namespaced_pod(self, namespace, **options):
        self.calls.append(("pods", options.get("resource_version")))
        return self.Listing()

    def list_namespaced_event(self, namespace, **options):
        self.calls.append(("events", options.get("resource_version")))
        if self.held is not None:
            self.held.wait(10)
        return self.Listing()


def test_why_a_job_waits_is_asked_once_it_waited_from_the_api_servers_cache_a_failure_from_etcd():
    """Every pass of a Pending Job listed its pods (and the Events of its PodGroup): read from etcd,
    a list by label reads every pod of the namespace (seconds each with 1,000 runs in it). Those
    come from the watch cache (resourceVersion 0), and only once the Job has waited
    EXPLAIN_PENDING_AFTER seconds, then at most that often: at 1,000 runs most of the operator's
    requests asked why Jobs waited that Volcano placed a second later. A failed Job's pods, read
    once for its message and reason, come from etcd."""
    from noisy_student_operator.core.planner import JobObservation, JobState
    from noisy_student_operator.volcano import EXPLAIN_PENDING_AFTER, WATCHED_FOR, VolcanoJobs

    now = [0.0]
    jobs = VolcanoJobs(clock=lambda: now[0], explainer=False, sleep=lambda seconds: None)
    jobs.objects, jobs.core = CountingJobsApi(), CountingCore()
    jobs.objects.jobs[("ml", "a-u")] = podgroup("Pending")  # the gang not admitted: Volcano says why in Events
    calls = jobs.core.calls
    jobs.record(None, volcano_job("a", "Pending", uid="u"))
    for _ in range(4):  # passes in its first seconds: nothing asked, nothing said
        assert jobs.observe("ml", "a") == JobObservation(JobState.PENDING)
        assert jobs.explain() == 0
        now[0] += EXPLAIN_PENDING_AFTER / 4
    assert jobs.observe("ml", "a") == JobObservation(JobState.PENDING) and not calls  # due: queued
    assert jobs.explain() == 1 and calls == [("pods", "0"), ("events", "0")]
    waiting = jobs.observe("ml", "a")  # the next pass reports the answer, once
    assert waiting.state is JobState.PENDING and "Volcano has not created its pods yet" in waiting.message
    assert jobs.observe("ml", "a").message is None and jobs.explain() == 0  # the status keeps the answer
    now[0] += EXPLAIN_PENDING_AFTER
    jobs.observe("ml", "a")
    assert jobs.explain() == 1 and jobs.observe("ml", "a").message and len(calls) == 4
    jobs.objects.jobs[("ml", "a-u")] = podgroup("Inqueue")  # admitted: its pods say why, no Events are listed
    now[0] += EXPLAIN_PENDING_AFTER
    jobs.observe("ml", "a")
    assert jobs.explain() == 1 and jobs.observe("ml", "a").message and calls[4:] == [("pods", "0")]
    jobs.record("MODIFIED", volcano_job("a", "Running", uid="u"))
    assert jobs.observe("ml", "a") == JobObservation(JobState.RUNNING)
    calls[:] = calls[:4]
    jobs.record("MODIFIED", volcano_job("a", "Pending", uid="u"))  # waiting again (Volcano restarted it)
    assert jobs.observe("ml", "a").message is None and jobs.explain() == 0 and len(calls) == 4
    now[0] += EXPLAIN_PENDING_AFTER
    jobs.observe("ml", "a")  # queued ...
    jobs.record("MODIFIED", volcano_job("a", "Running", uid="u"))
    jobs.observe("ml", "a")  # ... and started before its turn: not asked
    assert jobs.explain() == 0 and len(calls) == 4
    calls.clear()
    jobs.record("MODIFIED", volcano_job("a", "Failed", uid="u"))
    assert jobs.observe("ml", "a").state is JobState.FAILED
    assert calls == [("pods", None)]
    # Queued, then gone without a watch event (read again after WATCHED_FOR: not found): not asked.
    jobs.record("MODIFIED", volcano_job("b", "Pending", uid="v"))
    jobs.observe("ml", "b")
    now[0] += WATCHED_FOR
    jobs.record("MODIFIED", volcano_job("b", "Pending", uid="v"))
    jobs.observe("ml", "b")  # queued
    now[0] += WATCHED_FOR
    assert jobs.observe("ml", "b").state is JobState.MISSING
    assert jobs.explain() == 0


def test_the_operator_asks_waiting_jobs_why_one_at_a_time_a_few_a_second_and_never_in_a_pass():
    """The API server keeps no watch cache of Events: each Events list (why a gang waits) reads
    every Event of the namespace from etcd. At 1,000 runs whose new Jobs waited on a busy cluster,
    every pass asked, and the passes the next stages waited on spent seconds in those lists
    (hand-off p50 10 s). Budgeted to 2 askings a second, they still ran in passes: once the
    namespace held tens of thousands of Events, each list took 15 s, eight workers waited in
    them at once, and passes over the same runs waited for those (hand-off p95 over 10 s).
    Passes only queue a due Job; one explainer asks, one Job at a time, EXPLAIN_PER_SECOND a
    second, each waiting Job in its turn."""
    import threading
    import time

    from noisy_student_operator.volcano import EXPLAIN_PENDING_AFTER, EXPLAIN_PER_SECOND, VolcanoJobs

    now, pauses = [0.0], []
    jobs = VolcanoJobs(clock=lambda: now[0], explainer=False, sleep=pauses.append)
    jobs.objects, jobs.core = CountingJobsApi(), CountingCore()
    names = [f"j{i}" for i in range(100)]
    for name in names:
        jobs.objects.jobs[("ml", f"{name}-{name}")] = podgroup("Pending")
        jobs.record(None, volcano_job(name, "Pending", uid=name))
        jobs.observe("ml", name)  # seen waiting: due in EXPLAIN_PENDING_AFTER
    now[0] += EXPLAIN_PENDING_AFTER
    for _ in range(3):  # three passes over every waiting Job within a second: none asks
        assert not any(jobs.observe("ml", name).message for name in names)
        now[0] += 0.3
    assert not jobs.core.calls
    assert jobs.explain() == len(names)  # one at a time, each followed by its pause
    assert pauses == [1.0 / EXPLAIN_PER_SECOND] * len(names)
    assert all(jobs.observe("ml", name).message for name in names)  # each answer, on the next pass
    for _ in range(int(len(names) / EXPLAIN_PER_SECOND) - 1):  # not before every Job had its turn
        now[0] += 1.0
        assert not any(jobs.observe("ml", name).message for name in names)
    assert jobs.explain() == 0

    # With the explainer on its thread, a pass over a due Job returns while the API server
    # takes its time over the Events list.
    held = threading.Event()
    jobs = VolcanoJobs(clock=lambda: now[0], sleep=lambda seconds: None)
    jobs.objects, jobs.core = CountingJobsApi(), CountingCore(held)
    jobs.objects.jobs[("ml", "slow-slow")] = podgroup("Pending")
    jobs.record(None, volcano_job("slow", "Pending", uid="slow"))
    jobs.observe("ml", "slow")
    now[0] += EXPLAIN_PENDING_AFTER
    started = time.monotonic()
    assert jobs.observe("ml", "slow").message is None
    assert time.monotonic() - started < 5
    for _ in range(500):
        if ("events", "0") in jobs.core.calls:
            break
        time.sleep(0.01)
    assert ("events", "0") in jobs.core.calls  # the explainer asks meanwhile
    held.set()
    for _ in range(500):
        message = jobs.observe("ml", "slow").message
        if message:
            break
        time.sleep(0.01)
    assert "Volcano has not created its pods yet" in message


def test_an_answer_of_the_explainer_asks_for_a_pass_of_the_jobs_run_at_once_in_kopfs_context():
    """The explainer's answer waited for the run's next timer pass (up to `--interval`) to reach
    its status: now the answer asks for a pass of the Job's run (a hint, due at once), from the
    explainer's thread, in the context of the pass that started it (kopf's, where Events post)."""
    import contextvars
    import threading

    from noisy_student_operator.backend import LABEL_RUN, TorchXJobBackend
    from noisy_student_operator.controller import RunController
    from noisy_student_operator.volcano import EXPLAIN_PENDING_AFTER, VolcanoJobs

    handler_context = contextvars.ContextVar("handler_context", default=None)
    for background in (False, True):
        now, hinted, done = [0.0], [], threading.Event()

        def hint(namespace, run):
            hinted.append((namespace, run, handler_context.get()))
            done.set()

        jobs = VolcanoJobs(clock=lambda: now[0], explainer=background, sleep=lambda seconds: None)
        jobs.objects, jobs.core = CountingJobsApi(), CountingCore()
        jobs.objects.jobs[("ml", "a-u")] = podgroup("Pending")
        controller = RunController(runs_api=None, backends={
            "kubernetes": TorchXJobBackend("kubernetes", runner=object(), volcano=jobs)})
        controller.on_explained(hint)
        jobs.record(None, volcano_job("a", "Pending", uid="u", labels={LABEL_RUN: "r"}))
        jobs.observe("ml", "a")
        now[0] += EXPLAIN_PENDING_AFTER
        handler_context.set("kopf")  # the pass that queues the Job (and starts the explainer) runs in it
        jobs.observe("ml", "a")
        if not background:
            assert jobs.explain() == 1
        assert done.wait(5)
        assert hinted == [("ml", "r", "kopf")]
        assert "Volcano has not created its pods yet" in jobs.observe("ml", "a").message
        handler_context.set(None)


def test_the_job_handler_feeds_the_backends_observation(monkeypatch):
    seen = []

    class Backend:
        def job_changed(self, event_type, job):
            seen.append((event_type, job["metadata"]["name"]))

    from noisy_student_operator.controller import RunController

    monkeypatch.setattr(handlers, "_controller", RunController(runs_api=None, backends={"kubernetes": Backend()}))
    monkeypatch.setattr(handlers, "_hints", type("NoHints", (), {"hint": lambda *a: None})())
    job = volcano_job("a", "Running", labels={"noisystudent.dev/run": "r"})
    job_event(namespace="ml", labels=job["metadata"]["labels"], type=None, status=job["status"], body=job)
    job_event(namespace="ml", labels=job["metadata"]["labels"], type="DELETED", status={}, body=job)
    assert seen == [(None, "a"), ("DELETED", "a")]


def test_only_a_job_change_that_a_pass_reads_brings_its_run_a_pass(monkeypatch):
    """Volcano rewrites a Job's status as each of its pods starts (64 times for a 64-shard label
    stage): each was a hint, a GET of the run and a pass that read nothing new. A change of what
    a pass reads of the Job (its phase; its deletion) still is one."""
    from noisy_student_operator.controller import RunController
    from noisy_student_operator.volcano import VolcanoJobs

    jobs = VolcanoJobs()
    hinted = []

    class Backend:
        def job_changed(self, event_type, job):
            return jobs.record(event_type, job)

    class Recorder:
        def hint(self, namespace, name, seconds):
            hinted.append((name, seconds))

    monkeypatch.setattr(handlers, "_controller", RunController(runs_api=None, backends={"kubernetes": Backend()}))
    monkeypatch.setattr(handlers, "_hints", Recorder())
    labels = {"noisystudent.dev/run": "r"}

    def event(type_, phase, **counts):
        job = volcano_job("a", phase, labels=labels)
        job["status"].update(counts)
        job_event(namespace="ml", labels=labels, type=type_, status=job["status"], body=job)

    event(None, "Pending")  # listed at start
    event("MODIFIED", "Running", running=1)
    for running in range(2, 65):
        event("MODIFIED", "Running", running=running)
    event("MODIFIED", "Completed", succeeded=64)
    event("DELETED", "Completed", succeeded=64)
    assert hinted == [("r", handlers.HINT_DELAY), ("r", 0.0), ("r", 0.0)]


def test_the_operators_api_clients_keep_a_connection_per_worker(tmp_path, monkeypatch):
    """urllib3 keeps 10 by default: the operator's 28 workers' passes opened and dropped connections."""
    from kubernetes import client, config

    from noisy_student_operator import kube
    from noisy_student_operator.backend import make_runner
    from noisy_student_operator.kube import load_kube_config
    from noisy_student_operator.volcano import VolcanoJobs

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:6443'}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\nusers: [{name: u, user: {token: t}}]\n")
    load = config.load_kube_config
    monkeypatch.setattr(config, "load_kube_config", lambda: load(config_file=str(kubeconfig)))
    monkeypatch.setattr(kube, "_configuration", None)  # what load_kube_config keeps, restored after
    previous = client.Configuration.get_default_copy()
    try:
        load_kube_config(connections=handlers.MAX_WORKERS + handlers.HINT_WORKERS)
        pool = client.ApiClient().rest_client.pool_manager.connection_pool_kw["maxsize"]
        assert pool == handlers.MAX_WORKERS + handlers.HINT_WORKERS
        # kopf's login then loads the kubeconfig into the default configuration again (10
        # connections); the clients made after it, on the first passes, keep the operator's.
        config.load_kube_config()
        assert client.ApiClient().rest_client.pool_manager.connection_pool_kw["maxsize"] != pool
        submitter = make_runner()._scheduler("kubernetes")._api_client()  # TorchX's, for the Volcano Jobs
        for later in (submitter, VolcanoJobs().objects.api_client, VolcanoJobs().core.api_client):
            assert later.rest_client.pool_manager.connection_pool_kw["maxsize"] == pool
    finally:
        client.Configuration.set_default(previous)


ARENA_PROBE = """
import ctypes, sys, threading
from noisy_student_operator.operator_main import limit_malloc_arenas
if sys.argv[1] == "capped":
    assert limit_malloc_arenas()
together = threading.Barrier(8)
def worker():  # alive at once, as the operator's workers are
    kept = [bytearray(10_000) for _ in range(20)]
    together.wait()
threads = [threading.Thread(target=worker) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
ctypes.CDLL(None).malloc_stats()  # 'Arena N:' for each, on stderr
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc arenas are glibc's")
def test_the_operator_caps_glibcs_malloc_arenas(monkeypatch):
    """Each of the operator's threads got a malloc arena of its own (up to eight per core), and an
    arena keeps what its thread freed."""
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)

    def arenas(mode):
        out = subprocess.run([sys.executable, "-c", ARENA_PROBE, mode], capture_output=True, text=True, check=True)
        return out.stderr.count("Arena ")

    assert arenas("uncapped") >= 8  # the main thread's and one per worker (up to 8 per core)
    assert arenas("capped") == 2
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # the environment wins
    from noisy_student_operator.operator_main import limit_malloc_arenas

    assert limit_malloc_arenas() is False


def test_kopf_keeps_each_runs_body_without_its_field_managers_bookkeeping():
    """kopf keeps every run's latest body for its timer: a thousand bodies, of which managedFields
    were 37 % of the JSON (the harness's, kopf's and the status writer's entries) and nothing reads."""
    from noisy_student_operator.api import PLURAL
    from noisy_student_operator.controller import RunController

    metadata = {"name": "a", "namespace": "ml", "resourceVersion": "7",
                "managedFields": [{"manager": "kopf", "fieldsV1": {"f:metadata": {"f:finalizers": {}}}}]}
    raw = {"type": "MODIFIED", "object": {"metadata": metadata, "spec": {"x": 1}}}
    asyncio.run(handlers.on_run_event(event=raw))
    assert raw["object"]["metadata"] == {"name": "a", "namespace": "ml", "resourceVersion": "7"}
    assert raw["object"]["spec"] == {"x": 1}
    # A new dict, not the old one shrunk: a pass copying the previous body in a thread may be reading it.
    assert "managedFields" in metadata
    asyncio.run(handlers.on_run_event(event={"type": None, "object": {"metadata": {"name": "b"}}}))  # nothing to drop

    kopf_registry = kopf.OperatorRegistry()
    previous = kopf.get_default_registry()
    kopf.set_default_registry(kopf_registry)
    try:
        handlers.register(RunController(runs_api=None, backends={}))
    finally:
        kopf.set_default_registry(previous)
    watching = {(h.fn, h.selector.plural) for h in kopf_registry._watching.get_all_handlers()}
    assert (handlers.on_run_event, PLURAL) in watching
