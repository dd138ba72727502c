"""The operator's reconcile (without kopf): fresh reads, status writes, events, restarts."""

import copy
import time
from pathlib import Path

import pytest

from noisy_student_operator.api import RunSpec
from noisy_student_operator.backend import InMemoryJobBackend
from noisy_student_operator.controller import InvalidRun, RunController, SchedulerNotServed
from noisy_student_operator.core.keys import workload_identity
from noisy_student_operator.core.layout import BALANCE, EXPORT, LABEL, STUDENT, TEACHER, RunLayout, Stage, job_name
from noisy_student_operator.core.planner import JobState
from noisy_student_operator.kube import Conflict
from noisy_student_operator.reconcile import MarkerReader, Reconciler
from noisy_student_workloads.stage import write_done
from noisy_student_workloads.store import open_store


class InMemoryRunsApi:
    """The RunsApi seam over a dict, counting calls."""

    def __init__(self):
        self.objects = {}
        self.patches = 0

    def add(self, body):
        body = copy.deepcopy(body)
        body["metadata"].setdefault("generation", 1)
        body["metadata"].setdefault("uid", "uid-1")
        body["metadata"]["resourceVersion"] = "1"
        self.objects[(body["metadata"]["namespace"], body["metadata"]["name"])] = body

    def get(self, namespace, name, cached=False):
        body = self.objects.get((namespace, name))
        return copy.deepcopy(body) if body else None

    def patch_status(self, namespace, name, status, resource_version=None):
        body = self.objects[(namespace, name)]
        if resource_version is not None and resource_version != body["metadata"]["resourceVersion"]:
            raise Conflict(f"{namespace}/{name} changed since it was read")
        self.patches += 1
        body["metadata"]["resourceVersion"] = str(int(body["metadata"]["resourceVersion"]) + 1)
        merged = dict(body.get("status") or {})
        for key, value in status.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        body["status"] = merged

    def annotate(self, namespace, name, annotations):
        """Another writer's metadata change (kopf's bookkeeping, `kubectl annotate`): a new resourceVersion."""
        body = self.objects[(namespace, name)]
        body["metadata"].setdefault("annotations", {}).update(annotations)
        body["metadata"]["resourceVersion"] = str(int(body["metadata"]["resourceVersion"]) + 1)


@pytest.fixture
def setup(tmp_path):
    api = InMemoryRunsApi()
    backend = InMemoryJobBackend()
    events = []
    controller = RunController(
        api,
        {"kubernetes": backend},
        reconciler_for=lambda b: Reconciler(b, MarkerReader()),
        post_event=lambda body, t, r, m: events.append((t, r, m)),
    )
    body = {
        "apiVersion": "noisystudent.dev/v1alpha1",
        "kind": "NoisyStudentRun",
        "metadata": {"name": "demo", "namespace": "ml"},
        "spec": {
            "data": {"labeled": "s3://d/l.tar", "unlabeled": "s3://d/u.tar", "validation": "s3://d/v.tar",
                     "numClasses": 10},
            "artifacts": {"uri": tmp_path.as_uri() + "/", "secretRef": {"name": "s3-creds"}},
            "teacher": {"model": "resnet18"},
            "students": [{"model": "resnet18"}],
        },
    }
    api.add(body)
    store = open_store(tmp_path.as_uri())
    return api, backend, controller, events, store, layout_of(api)


def layout_of(api):
    spec = RunSpec.model_validate(api.objects[("ml", "demo")]["spec"])
    return RunLayout.for_run(spec, "ml", "demo", workload_identity(spec, "kubernetes"))


def name(layout, stage, attempt=0):
    return job_name(stage, layout.key(stage), attempt)


TEACHER_0 = Stage(0, TEACHER)


def write_marker(store, layout, stage, metrics=None):
    store.put_json(layout.marker_uri(stage), {"metrics": metrics or {}})


def test_first_pass_submits_teacher_and_writes_status(setup):
    api, backend, controller, events, store, layout = setup
    controller.reconcile("ml", "demo")
    assert backend.submissions == [name(layout, TEACHER_0)]
    status = api.objects[("ml", "demo")]["status"]
    assert status["stage"] == "Training"
    assert status["jobs"][0]["handle"] == f"memory://ml/{name(layout, TEACHER_0)}"
    assert status["observedGeneration"] == 1
    assert [r for _, r, _ in events] == ["JobSubmitted"]


def test_idle_pass_writes_nothing(setup):
    api, backend, controller, events, store, layout = setup
    controller.reconcile("ml", "demo")
    controller.reconcile("ml", "demo")  # Pending -> Running is a change
    assert api.objects[("ml", "demo")]["status"]["jobs"][0]["state"] == "Running"
    patches = api.patches
    controller.reconcile("ml", "demo")
    controller.reconcile("ml", "demo")
    assert api.patches == patches
    assert backend.submissions == [name(layout, TEACHER_0)]


def test_restart_mid_run_never_duplicates_or_redoes(setup):
    api, backend, controller, events, store, layout = setup
    controller.reconcile("ml", "demo")
    backend.jobs[name(layout, TEACHER_0)] = JobState.SUCCEEDED
    write_marker(store, layout, TEACHER_0, {"top1": 0.6, "parameters": 10})
    # A new controller (operator restart) with empty caches.
    restarted = RunController(api, {"kubernetes": backend})
    restarted.reconcile("ml", "demo")
    assert backend.submissions == [name(layout, TEACHER_0), name(layout, Stage(1, LABEL))]
    # Status lost its record of the label job (killed before the status write): the
    # planner submits the same name again and the backend treats it as existing.
    api.objects[("ml", "demo")]["status"]["jobs"] = api.objects[("ml", "demo")]["status"]["jobs"][:1]
    restarted.reconcile("ml", "demo")
    assert backend.submissions.count(name(layout, Stage(1, LABEL))) == 2
    assert len([n for n in backend.jobs if n.startswith(name(layout, Stage(1, LABEL)))]) == 1


def test_status_progress_of_a_running_label_stage_sums_its_replicas_files(setup):
    """What the label workload writes (one `progress-RRRRR.json` per replica, by `ImageProgress`) reaches
    `status.progress` and the Progress and ETA columns."""
    from noisy_student_workloads.predictions import progress_name
    from noisy_student_workloads.stage import ImageProgress

    api, backend, controller, events, store, _ = setup
    api.objects[("ml", "demo")]["spec"]["resources"] = {"labelShards": 2}
    layout = layout_of(api)
    controller.reconcile("ml", "demo")
    backend.jobs[name(layout, TEACHER_0)] = JobState.SUCCEEDED
    write_marker(store, layout, TEACHER_0, {"top1": 0.6, "parameters": 10})
    controller.reconcile("ml", "demo")
    controller.reconcile("ml", "demo")  # the label job runs, nothing written yet
    status = api.objects[("ml", "demo")]["status"]
    assert status["stage"] == "Labeling" and "progress" not in status
    label = Stage(1, LABEL)
    first = ImageProgress(layout.stage_uri(label, progress_name(0)), 600, 1000)
    first.started -= 10  # ten seconds in: 60 images/s
    first.update_images(600, done=True)
    second = ImageProgress(layout.stage_uri(label, progress_name(1)), 400, 1000)
    second.started -= 10
    second.update_images(100)  # 10 images/s, 300 to go
    controller.reconcile("ml", "demo")
    progress = api.objects[("ml", "demo")]["status"]["progress"]
    assert {k: progress[k] for k in ("stage", "generation", "images", "imagesTotal", "percent")} == {
        "stage": "label", "generation": 1, "images": 700, "imagesTotal": 1000, "percent": 70}
    # the finished replica adds its images, not its rate: 300 images left at 10/s
    assert progress["imagesPerSecond"] == pytest.approx(10, rel=0.01)
    assert progress["etaSeconds"] == pytest.approx(30, abs=1) and progress["eta"].endswith("s")
    assert progress.get("epoch") is None and progress.get("epochs") is None


def test_delete_cancels_running_jobs(setup):
    api, backend, controller, events, store, layout = setup
    controller.reconcile("ml", "demo")
    body = api.get("ml", "demo")
    assert controller.cancel_all(body) == [name(layout, TEACHER_0)]
    assert backend.jobs[name(layout, TEACHER_0)] is JobState.CANCELLED


def test_invalid_stored_spec_marks_failed(setup):
    api, backend, controller, events, store, layout = setup
    api.objects[("ml", "demo")]["spec"]["pseudoLabels"] = {"confidenceThreshold": 2}
    with pytest.raises(InvalidRun, match="spec.pseudoLabels.confidenceThreshold"):
        controller.reconcile("ml", "demo")
    status = api.objects[("ml", "demo")]["status"]
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "InvalidSpec"


def test_a_scheduler_the_operator_does_not_serve_is_refused_with_a_condition(setup):
    """In a cluster, `local_cwd` would fork the stages inside the operator's pod (with its S3 keys and
    token): an operator that serves only `kubernetes` refuses such a run instead of running it."""
    api, backend, controller, events, store, layout = setup
    api.objects[("ml", "demo")]["spec"]["scheduler"] = {"name": "local_cwd"}
    with pytest.raises(SchedulerNotServed, match="spec.scheduler.name: local_cwd is not served"):
        controller.reconcile("ml", "demo")
    assert backend.submissions == []
    body = api.objects[("ml", "demo")]
    failed = next(c for c in body["status"]["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "SchedulerNotServed"
    assert "--scheduler local_cwd" in failed["message"]
    assert events[-1][:2] == ("Warning", "SchedulerNotServed")
    assert controller.settled(body)  # the timer leaves it alone until the spec changes
    assert controller.cancel_all(body) == []  # deleting it needs no backend


def test_settled_runs_are_skipped_by_the_timer(setup):
    api, backend, controller, events, store, layout = setup
    for stage in (TEACHER_0, Stage(1, LABEL), Stage(1, BALANCE), Stage(1, STUDENT), Stage(1, EXPORT)):
        write_marker(store, layout, stage, {"top1": 0.5, "parameters": 1})
    controller.reconcile("ml", "demo")
    body = api.get("ml", "demo")
    assert body["status"]["stage"] == "Succeeded"
    assert controller.settled(body)
    body["metadata"]["generation"] = 2
    assert not controller.settled(body)


def test_a_timer_pass_reads_the_body_kopf_holds_and_a_stale_one_is_redone_from_a_fresh_read(setup):
    api, backend, controller, events, store, layout = setup
    gets = []
    get = api.get
    api.get = lambda namespace, name: gets.append(name) or get(namespace, name)
    stale = get("ml", "demo")
    controller.reconcile("ml", "demo", body=get("ml", "demo"))
    assert gets == [] and backend.submissions == [name(layout, TEACHER_0)]
    # Before the first pass's status write (the watch has not delivered it yet): the pass reads the run
    # fresh instead, and does not ask for the teacher again.
    controller.reconcile("ml", "demo", body=stale)
    assert gets == ["demo"] and backend.submissions == [name(layout, TEACHER_0)]
    status = api.objects[("ml", "demo")]["status"]
    assert [j["name"] for j in status["jobs"]] == [name(layout, TEACHER_0)] and status["jobs"][0]["state"] == "Running"
    assert [r for _, r, _ in events] == ["JobSubmitted"]  # the stale pass posted nothing


def test_a_body_stale_for_another_reason_meets_a_409_and_the_pass_is_done_again_from_a_fresh_read(setup):
    api, backend, controller, events, store, layout = setup
    stale = api.get("ml", "demo")
    api.patch_status("ml", "demo", {"otherWriter": 1})  # someone else wrote since
    controller.reconcile("ml", "demo", body=stale)
    status = api.objects[("ml", "demo")]["status"]
    assert status["otherWriter"] == 1 and [j["name"] for j in status["jobs"]] == [name(layout, TEACHER_0)]
    assert backend.submissions == [name(layout, TEACHER_0)] * 2  # asked again: the backend says it exists
    assert list(backend.jobs) == [name(layout, TEACHER_0)]


def test_a_status_write_that_meets_only_a_metadata_change_is_written_again_not_planned_again(setup):
    """kopf patches a run's metadata (its last-handled annotation, finalizers) between a pass's read
    and its status write. Planning again would ask for every job the pass submitted once more (a
    create each, answered 409); with the slow operator of the 300-run memory probe, each teacher
    job was asked for 4-6 times. A pass reads the spec, status, generation and uid, so a change
    elsewhere cannot change its plan: the same status is written against the new version."""
    api, backend, controller, events, store, layout = setup
    stale = api.get("ml", "demo")
    api.annotate("ml", "demo", {"kopf.zalando.org/last-handled-configuration": "{}"})
    controller.reconcile("ml", "demo", body=stale)
    body = api.objects[("ml", "demo")]
    assert [j["name"] for j in body["status"]["jobs"]] == [name(layout, TEACHER_0)]
    assert backend.submissions == [name(layout, TEACHER_0)]  # asked for once
    assert "kopf.zalando.org/last-handled-configuration" in body["metadata"]["annotations"]
    assert [r for _, r, _ in events] == ["JobSubmitted"]
    # A change of what a pass reads (the spec) still means planning again from a fresh read.
    stale = api.get("ml", "demo")
    api.objects[("ml", "demo")]["spec"]["students"].append({"model": "resnet18"})
    api.objects[("ml", "demo")]["metadata"]["generation"] = 2
    api.annotate("ml", "demo", {})
    controller.reconcile("ml", "demo", body=stale)
    assert api.objects[("ml", "demo")]["status"]["observedGeneration"] == 2


def test_a_hint_about_a_finished_runs_job_reads_the_run_and_nothing_else(setup, monkeypatch):
    """A finished run's Volcano Job changing (removed, say) hints a pass: one GET of the
    run, no observation of jobs or markers, no status write."""
    api, backend, controller, events, store, layout = setup
    for stage in (TEACHER_0, Stage(1, LABEL), Stage(1, BALANCE), Stage(1, STUDENT), Stage(1, EXPORT)):
        write_marker(store, layout, stage, {"top1": 0.5, "parameters": 1})
    controller.reconcile("ml", "demo")
    assert api.get("ml", "demo")["status"]["stage"] == "Succeeded"
    patches = api.patches
    monkeypatch.setattr(controller.reconcilers["kubernetes"], "reconcile",
                        lambda *args: pytest.fail("a settled run was observed"))
    assert controller.reconcile("ml", "demo", unless_idle=True) is None
    assert api.patches == patches


def sample(name, **labels):
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metrics_count_submissions_failures_retries_and_conditions(setup):
    api, backend, controller, events, store, layout = setup
    api.objects[("ml", "demo")]["spec"]["retry"] = {"limit": 1, "backoffSeconds": 0}
    assert layout_of(api).keys == layout.keys  # retries are not part of any key
    submitted = sample("noisy_student_job_submissions_total", stage="teacher")
    failed = sample("noisy_student_job_failures_total", stage="teacher")
    retried = sample("noisy_student_job_retries_total", stage="teacher")
    passes = sample("noisy_student_reconcile_duration_seconds_count")
    controller.reconcile("ml", "demo")
    assert sample("noisy_student_runs", condition="Progressing") >= 1
    backend.jobs[name(layout, TEACHER_0)] = JobState.FAILED
    controller.reconcile("ml", "demo")  # records the failure, retries at once (backoff 0)
    assert sample("noisy_student_job_submissions_total", stage="teacher") == submitted + 2
    assert sample("noisy_student_job_failures_total", stage="teacher") == failed + 1
    assert sample("noisy_student_job_retries_total", stage="teacher") == retried + 1
    assert sample("noisy_student_reconcile_duration_seconds_count") == passes + 2


def test_the_handoff_from_a_jobs_end_to_the_next_stages_submission_is_measured_once(setup):
    """`noisy_student_handoff_seconds`: from the job's end seen on the watch to the pass that
    submitted what follows; a retry after a failure and a run's last job are not handoffs."""
    api, backend, controller, events, store, layout = setup
    api.objects[("ml", "demo")]["spec"]["retry"] = {"limit": 1, "backoffSeconds": 0}
    handoffs = sample("noisy_student_handoff_seconds_count")
    total = sample("noisy_student_handoff_seconds_sum")
    controller.reconcile("ml", "demo")
    backend.jobs[name(layout, TEACHER_0)] = JobState.FAILED
    controller.job_ended("ml", "demo")
    controller.reconcile("ml", "demo")  # the teacher's retry: not a handoff
    assert backend.submissions == [name(layout, TEACHER_0), name(layout, TEACHER_0, 1)]
    assert sample("noisy_student_handoff_seconds_count") == handoffs
    backend.jobs[name(layout, TEACHER_0, 1)] = JobState.SUCCEEDED
    write_marker(store, layout, TEACHER_0, {"top1": 0.6, "parameters": 10})
    controller.job_ended("ml", "demo")
    time.sleep(0.05)
    controller.job_ended("ml", "demo")  # a second event about the same end: the first one counts
    controller.reconcile("ml", "demo")
    assert backend.submissions[-1] == name(layout, Stage(1, LABEL))
    assert sample("noisy_student_handoff_seconds_count") == handoffs + 1
    assert sample("noisy_student_handoff_seconds_sum") - total >= 0.05
    controller.reconcile("ml", "demo")  # nothing ended since: nothing measured
    assert sample("noisy_student_handoff_seconds_count") == handoffs + 1
    controller.job_ended("ml", "demo")
    controller.cancel_all(api.objects[("ml", "demo")])  # the run is deleted: its end is forgotten
    assert controller._ended == {}


def test_stored_spec_and_status_with_unknown_fields_are_read(setup):
    """A newer operator (or a rollback) left fields this version does not know: the run goes on."""
    api, backend, controller, events, store, layout = setup
    stored = api.objects[("ml", "demo")]
    stored["spec"]["futureFeature"] = {"enabled": True}
    stored["spec"]["teacher"]["compile"] = True
    stored["status"] = {"stage": "Training", "futureCounter": 3,
                        "jobs": [{"name": "x", "stage": "teacher", "generation": 0, "queuePosition": 4}]}
    controller.reconcile("ml", "demo")
    status = api.objects[("ml", "demo")]["status"]
    assert not any(c["type"] == "Failed" and c["status"] == "True" for c in status["conditions"])
    assert backend.submissions == [name(layout, TEACHER_0)]
    assert "InvalidSpec" not in [r for _, r, _ in events]


def test_run_files_stay_strict(tmp_path):
    from noisy_student_operator.api import RunFileError, load_run_file

    text = (Path(__file__).parents[2] / "examples" / "quickstart.yaml").read_text()
    path = tmp_path / "run.yaml"
    path.write_text(text.replace("  students:", "  futureFeature: 1\n  students:"))
    with pytest.raises(RunFileError, match="futureFeature"):
        load_run_file(path)


# ----------------------------------------------------------------------------- marker cache and slow stores


def test_marker_cache_is_bounded_and_a_deleted_runs_markers_are_forgotten(setup):
    api, backend, controller, events, store, layout = setup
    markers = controller.reconcilers["kubernetes"].markers
    markers.max_entries = 2
    for stage in (TEACHER_0, Stage(1, LABEL), Stage(1, BALANCE)):
        write_marker(store, layout, stage, {"top1": 0.6, "parameters": 10})
    controller.reconcile("ml", "demo")
    assert markers.cached == 2  # the least recently used went first
    controller.cancel_all(api.get("ml", "demo"))
    assert markers.cached == 0


def test_the_marker_cache_keeps_what_a_pass_reads_of_a_marker_not_all_of_it(setup, monkeypatch):
    """A real training marker holds every corruption's scores and each output's sha256 (4-11 KB as
    Python objects): 20,000 cached (MAX_CACHED_MARKERS) would have been over 100 MB of the operator."""
    api, backend, controller, events, store, layout = setup
    monkeypatch.setenv("NSO_RUN", "ml/demo")
    outputs = {layout.stage_uri(TEACHER_0, f): "ab" * 32 for f in ("checkpoint.pt", "config.json", "metrics.json")}
    metrics = {"top1": 0.61, "top5": 0.9, "parameters": 10, "test_top1": 0.6, "corruption_top1": 0.5,
               "corruption": {c: [0.6, 0.5, 0.4] for c in ("contrast", "gaussian_noise", "pixelate")}}
    controller.reconcile("ml", "demo")
    written = write_done(layout.stage_uri(TEACHER_0), "teacher", metrics, outputs)
    backend.jobs[name(layout, TEACHER_0)] = JobState.SUCCEEDED
    controller.reconcile("ml", "demo")
    cached = controller.reconcilers["kubernetes"].markers._cached(layout.marker_uri(TEACHER_0))
    assert cached == {"run": "ml/demo", "finished": written["finished"],
                      "metrics": {"top1": 0.61, "top5": 0.9, "parameters": 10}}
    teacher = api.objects[("ml", "demo")]["status"]["generations"][0]
    assert (teacher["top1"], teacher["parameters"]) == (0.61, 10)


class CountingStore:
    """A store that counts its requests, each taking `delay` seconds (0, or an overloaded S3 endpoint)."""

    def __init__(self, store, delay=0.0):
        self.store, self.delay, self.calls = store, delay, []

    def __getattr__(self, method):  # exists, get_json, list, ...
        def call(uri, *args, **kwargs):
            self.calls.append((method, uri))
            time.sleep(self.delay)
            return getattr(self.store, method)(uri, *args, **kwargs)
        return call


def test_a_pass_over_a_running_stage_makes_no_store_request_and_its_end_reads_the_marker(setup):
    """At a thousand runs, timer passes over running stages were three or four S3 requests each
    (the current stage's marker, the export's, the progress file twice). The marker is written
    last and the job's end brings the pass that reads it; progress is one GET."""
    api, backend, _, events, store, layout = setup
    counting = CountingStore(store)
    controller = RunController(api, {"kubernetes": backend},
                               reconciler_for=lambda b: Reconciler(b, MarkerReader(lambda uri: counting)))
    controller.reconcile("ml", "demo")
    # before its job existed: the teacher's marker, and the export's (it may follow skipped generations)
    assert [m for m, _ in counting.calls] == ["get_json", "get_json"]
    counting.calls.clear()
    for _ in range(3):  # the teacher runs
        controller.reconcile("ml", "demo")
    assert counting.calls == [("get_json", layout.stage_uri(TEACHER_0, "progress.json"))] * 3
    write_marker(store, layout, TEACHER_0, {"top1": 0.6, "parameters": 10})
    counting.calls.clear()
    controller.reconcile("ml", "demo")  # the marker is there, the job still exits: not read yet
    assert backend.submissions == [name(layout, TEACHER_0)]
    assert [m for m, _ in counting.calls] == ["get_json"]
    backend.jobs[name(layout, TEACHER_0)] = JobState.SUCCEEDED
    controller.reconcile("ml", "demo")
    assert backend.submissions == [name(layout, TEACHER_0), name(layout, Stage(1, LABEL))]
    counting.calls.clear()
    controller.reconcile("ml", "demo")  # the teacher's marker is cached; the label job runs
    assert [m for m, _ in counting.calls] == ["get_json"]  # its replica's progress file


def test_the_operators_passes_read_a_running_stages_progress_at_most_every_progress_every_seconds(setup):
    """At 1,000 runs the timer's passes (every 10 s per run) read a progress file each: 100 GETs
    a second, most of the S3 server's requests and a fifth of the operator's CPU (botocore), for
    figures that move over minutes. The operator's passes show the progress as last read for
    PROGRESS_EVERY seconds; status keeps showing it meanwhile."""
    from datetime import datetime, timedelta, timezone

    from noisy_student_operator.reconcile import PROGRESS_EVERY

    api, backend, _, events, store, layout = setup
    counting = CountingStore(store)
    now = [datetime(2026, 1, 1, tzinfo=timezone.utc)]
    controller = RunController(api, {"kubernetes": backend}, reconciler_for=lambda b: Reconciler(
        b, MarkerReader(lambda uri: counting), clock=lambda: now[0], progress_every=PROGRESS_EVERY))
    controller.reconcile("ml", "demo")
    progress_uri = layout.stage_uri(TEACHER_0, "progress.json")
    store.put_json(progress_uri, {"epoch": 1.0, "epochs": 4, "updated": "2026-01-01T00:00:00Z"})
    counting.calls.clear()
    for _ in range(3):  # passes within PROGRESS_EVERY seconds: one read, the progress shown on each
        controller.reconcile("ml", "demo")
        assert api.objects[("ml", "demo")]["status"]["progress"]["epoch"] == 1.0
        now[0] += timedelta(seconds=PROGRESS_EVERY / 3 - 0.1)
    assert counting.calls == [("get_json", progress_uri)]
    store.put_json(progress_uri, {"epoch": 2.0, "epochs": 4, "updated": "2026-01-01T00:00:30Z"})
    now[0] += timedelta(seconds=1)
    controller.reconcile("ml", "demo")
    assert counting.calls == [("get_json", progress_uri)] * 2
    assert api.objects[("ml", "demo")]["status"]["progress"]["epoch"] == 2.0


def test_a_slow_store_ends_the_pass_at_its_deadline(setup):
    api, backend, _, events, store, layout = setup
    for stage in (TEACHER_0, Stage(1, LABEL), Stage(1, BALANCE)):
        write_marker(store, layout, stage, {"top1": 0.6, "parameters": 10})
    slow = CountingStore(store, 0.05)
    controller = RunController(api, {"kubernetes": backend},
                               reconciler_for=lambda b: Reconciler(b, MarkerReader(lambda uri: slow, deadline=0.12)),
                               post_event=lambda body, t, r, m: events.append((t, r, m)))
    assert controller.reconcile("ml", "demo") is None  # the pass gave up
    assert len(slow.calls) < 4  # three markers and the next stage's would take four
    ready = next(c for c in api.objects[("ml", "demo")]["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and "took more than 0.12 s" in ready["message"]
    assert backend.submissions == []
