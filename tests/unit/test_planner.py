"""The pure planner: transitions, retries with backoff, suspend, resume after a restart."""

from datetime import datetime, timedelta, timezone

import pytest

from noisy_student_operator.api import RunStatus, parse_run
from noisy_student_operator.core import reasons
from noisy_student_operator.core.conditions import get_condition, is_true
from noisy_student_operator.core.layout import BALANCE, EXPORT, LABEL, PREPARE, STUDENT, TEACHER, Stage, job_name
from noisy_student_operator.core.planner import (
    Cancel,
    JobObservation,
    JobState,
    Observation,
    RunRef,
    Submit,
    marker_summary,
    plan_run,
)

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def make_run(students=2, **spec):
    document = {
        "apiVersion": "noisystudent.dev/v1alpha1",
        "kind": "NoisyStudentRun",
        "metadata": {"name": "demo", "namespace": "ml"},
        "spec": {
            "data": {"labeled": "s3://d/l.tar", "unlabeled": "s3://d/u-{0..3}.tar",
                     "validation": "s3://d/v.tar", "numClasses": 10},
            "artifacts": {"uri": "s3://runs/"},
            "teacher": {"model": "resnet18"},
            "students": [{"model": "resnet18"}] * students,
            **spec,
        },
    }
    return parse_run(document).spec


class World:
    """Replays planner passes against a scripted world of jobs and markers."""

    def __init__(self, spec, generation=1):
        self.spec = spec
        self.status = RunStatus()
        self.jobs: dict[str, JobObservation] = {}
        self.store: dict[str, dict] = {}  # marker by stage key: the artifact store
        self.now = T0
        self.generation = generation
        self.submitted: list[str] = []
        self.cancelled: list[str] = []

    def step(self, seconds=1.0):
        self.now += timedelta(seconds=seconds)
        run = RunRef("demo", "ml", self.spec, self.status, self.generation)
        plan = plan_run(run, Observation(self.now, dict(self.jobs), self.markers()))
        for action in plan.actions:
            if isinstance(action, Submit):
                self.submitted.append(action.request.name)
                self.jobs[action.request.name] = JobObservation(JobState.RUNNING)
            elif isinstance(action, Cancel):
                self.cancelled.append(action.job.name)
                self.jobs[action.job.name] = JobObservation(JobState.CANCELLED)
        self.status = plan.status
        return plan

    @property
    def layout(self):
        return RunRef("demo", "ml", self.spec, self.status, self.generation).layout

    def name(self, stage, attempt=0):
        """The job name of `stage` under the current spec."""
        return job_name(stage, self.layout.key(stage), attempt)

    def uri(self, stage, *parts):
        return self.layout.stage_uri(stage, *parts)

    def markers(self):
        """What `MarkerReader` sees: the markers under the current keys, the completed prefix."""
        found = {}
        keys = self.layout.keys
        for stage, key in keys.items():
            if key not in self.store:
                export = list(keys)[-1]  # read after a gap too (generations skipped by stopWhenGainBelow)
                if keys[export] in self.store:
                    found[export] = self.store[keys[export]]
                break
            found[stage] = self.store[key]
        return found

    def mark(self, stage, marker):
        self.store[self.layout.key(stage)] = marker

    def finish(self, name, stage, top1=None, parameters=100):
        self.jobs[name] = JobObservation(JobState.SUCCEEDED)
        marker = {"stage": stage.kind}
        if stage.is_training:
            marker["metrics"] = {"top1": top1, "top5": 0.99, "parameters": parameters}
        if stage.kind == BALANCE:
            marker["metrics"] = {"images": 1234}
        self.mark(stage, marker)


def test_happy_path_walks_every_stage_and_promotes():
    world = World(make_run(students=2))
    plan = world.step()
    assert [a.request.name for a in plan.actions] == [world.name(Stage(0, TEACHER))]
    assert world.status.stage == "Training" and world.status.generation == 0
    assert is_true(world.status.conditions, reasons.PROGRESSING)

    world.finish(world.name(Stage(0, TEACHER)), Stage(0, TEACHER), top1=0.8)
    plan = world.step()
    assert [a.request.name for a in plan.actions] == [world.name(Stage(1, LABEL))]
    assert world.status.stage == "Labeling" and world.status.teacher_top1 == 0.8
    label = plan.actions[0].request
    assert label.config["checkpoint"] == world.uri(Stage(0, TEACHER), "checkpoint.pt")
    assert label.config["checkpoint"].startswith("s3://runs/ml/stages/teacher/")
    assert label.args["replicas"] == 1

    world.finish(world.name(Stage(1, LABEL)), Stage(1, LABEL))
    plan = world.step()
    assert [a.request.name for a in plan.actions] == [world.name(Stage(1, BALANCE))]
    world.finish(world.name(Stage(1, BALANCE)), Stage(1, BALANCE))
    plan = world.step()
    student = plan.actions[0].request
    assert student.name == world.name(Stage(1, STUDENT))
    assert student.config["teacher"] == {"model": "resnet18", "parameters": 100}
    assert student.config["pseudo"]["manifest"] == world.uri(Stage(1, BALANCE), "manifest.json")
    assert student.config["noise"]["rand_augment"] == {"ops": 2, "magnitude": 9, "magnitude_max": 30, "fill": "mean"}

    world.finish(world.name(Stage(1, STUDENT)), Stage(1, STUDENT), top1=0.85)
    plan = world.step()
    assert any(e.reason == reasons.PROMOTED for e in plan.events)
    assert plan.actions[0].request.config["checkpoint"] == world.uri(Stage(1, STUDENT), "checkpoint.pt")
    assert world.status.teacher_top1 == 0.85
    assert world.status.generations[1].images_used == 1234

    for kind in (LABEL, BALANCE, STUDENT):
        world.finish(world.name(Stage(2, kind)), Stage(2, kind), top1=0.87)
        plan = world.step()
    assert world.status.stage == "Exporting" and world.status.generation == 2
    export = plan.actions[0].request
    assert export.component == "export" and export.config["generations"] == [
        world.uri(Stage(g, TEACHER if g == 0 else STUDENT)) + "/" for g in range(3)]
    world.finish(export.name, Stage(2, EXPORT))
    world.step()
    assert world.status.stage == "Succeeded"
    assert world.status.model == world.uri(Stage(2, EXPORT), "model") + "/"
    assert is_true(world.status.conditions, reasons.SUCCEEDED)
    assert is_true(world.status.conditions, reasons.READY)
    assert not is_true(world.status.conditions, reasons.PROGRESSING)
    assert [g.top1 for g in world.status.generations] == [0.8, 0.85, 0.87]
    assert world.submitted == [
        world.name(Stage(0, TEACHER)), world.name(Stage(1, LABEL)), world.name(Stage(1, BALANCE)), world.name(Stage(1, STUDENT)),
        world.name(Stage(2, LABEL)), world.name(Stage(2, BALANCE)), world.name(Stage(2, STUDENT)),
        world.name(Stage(2, EXPORT)),
    ]
    # Once finished, nothing more happens.
    assert world.step().actions == []


def workload_marker(world, stage, top1, run):
    """A completion marker as the workloads write it (`noisy_student_workloads.stage.write_done`),
    with what people read of it too: every corruption's scores, each output's sha256."""
    outputs = [world.uri(stage, f) for f in ("checkpoint.pt", "config.json", "metrics.json")]
    metrics = {"images": 48520} if stage.kind == BALANCE else {}
    if stage.is_training or stage.kind == EXPORT:
        metrics = {"top1": top1, "top5": 0.99, "parameters": 373658, "test_top1": top1 - 0.01,
                   "corruption": {c: [0.8, 0.7, 0.5] for c in ("brightness", "contrast", "gaussian_blur")},
                   "corruption_top1": 0.7, "epochs": 9, "images_per_second": 1644.5, "weights": "ema"}
    return {"stage": stage.kind, "metrics": metrics, "outputs": outputs, "sha256": {u: "ab" * 32 for u in outputs},
            "finished": (T0 + timedelta(minutes=stage.generation)).isoformat(), "run": run}


def test_planning_from_a_markers_summary_is_planning_from_the_marker():
    """The operator caches `marker_summary` of each marker it reads (a training stage's marker is
    4-11 KB as Python objects, and 20,000 are cached): every pass must plan the same from it."""
    full, summarised = World(make_run(students=2)), World(make_run(students=2))
    top1 = iter([0.8, 0.85, 0.87, 0.88])
    for _ in range(12):
        plans = [full.step(), summarised.step()]
        assert plans[0].status == plans[1].status
        assert plans[0].events == plans[1].events and plans[0].actions == plans[1].actions
        if not plans[0].actions:
            break
        name = plans[0].actions[0].request.name
        stage = next(s for s in full.layout.keys if full.name(s) == name)
        marker = workload_marker(full, stage, next(top1) if stage.is_training or stage.kind == EXPORT else None,
                                 "ml/other" if stage.kind == LABEL else "ml/demo")  # a label job shared
        for world, written in ((full, marker), (summarised, marker_summary(marker))):
            world.jobs[name] = JobObservation(JobState.SUCCEEDED)
            world.mark(stage, written)
    assert full.status.stage == "Succeeded"
    assert [g.images_used for g in full.status.generations[1:]] == [48520, 48520]
    assert [s.state for s in full.status.stages if s.stage == LABEL] == ["Reused", "Reused"]
    assert len(repr(marker_summary(marker))) < len(repr(marker)) / 3


def test_waits_while_running_and_never_submits_twice():
    world = World(make_run())
    world.step()
    for _ in range(5):
        assert world.step().actions == []
    assert world.submitted == [world.name(Stage(0, TEACHER))]


def test_prepare_stage_comes_first_when_requested():
    spec = make_run(data={"numClasses": 10, "prepare": {"source": "digits", "labelsPerClass": 5}})
    world = World(spec)
    plan = world.step()
    request = plan.actions[0].request
    assert request.name == world.name(Stage(0, PREPARE)) and request.component == "prepare"
    assert request.args["output"] == world.uri(Stage(0, PREPARE)) + "/"
    assert world.status.stage == "Preparing"
    world.finish(world.name(Stage(0, PREPARE)), Stage(0, PREPARE))
    plan = world.step()
    assert plan.actions[0].request.config["labeled"] == world.uri(Stage(0, PREPARE), "labeled-*.tar")


@pytest.mark.parametrize(
    ("prepare", "test"),
    [
        ({"source": "fashion-mnist", "labelsPerClass": 5}, "test-*.tar"),  # its own test split, kept apart
        ({"source": "fashion-mnist", "labelsPerClass": 5, "testSplit": False}, None),
        ({"source": "digits", "labelsPerClass": 5}, None),  # no test split to keep
    ],
)
def test_a_prepared_test_split_is_scored_by_every_model_and_chosen_by_none(prepare, test):
    world = World(make_run(data={"numClasses": 10, "prepare": prepare}))
    request = world.step().actions[0].request
    assert request.args["test_split"] is prepare.get("testSplit", True)
    world.finish(world.name(Stage(0, PREPARE)), Stage(0, PREPARE))
    config = world.step().actions[0].request.config
    assert config["validation"] == world.uri(Stage(0, PREPARE), "validation-*.tar")
    assert config["test"] == (world.uri(Stage(0, PREPARE), test) if test else None)


def test_failure_retries_with_exponential_backoff_then_fails():
    world = World(make_run(retry={"limit": 2, "backoffSeconds": 10}))
    world.step()
    world.jobs[world.name(Stage(0, TEACHER))] = JobObservation(JobState.FAILED, "OOMKilled")
    plan = world.step()
    assert plan.actions == [] and plan.requeue_after == 10
    assert world.status.next_retry_at is not None
    assert get_condition(world.status.conditions, reasons.PROGRESSING).reason == reasons.WAITING_FOR_RETRY
    assert any(e.type == "Warning" and "OOMKilled" in e.message for e in plan.events)
    assert world.step(seconds=5).actions == []
    plan = world.step(seconds=5)
    assert [a.request.name for a in plan.actions] == [world.name(Stage(0, TEACHER), 1)]

    world.jobs[world.name(Stage(0, TEACHER), 1)] = JobObservation(JobState.FAILED, "OOMKilled")
    plan = world.step()
    assert plan.requeue_after == 20  # doubled
    plan = world.step(seconds=20)
    assert [a.request.name for a in plan.actions] == [world.name(Stage(0, TEACHER), 2)]

    world.jobs[world.name(Stage(0, TEACHER), 2)] = JobObservation(JobState.FAILED, "OOMKilled")
    plan = world.step()
    assert plan.actions == []
    failed = get_condition(world.status.conditions, reasons.FAILED)
    assert failed.status == "True" and failed.reason == reasons.STAGE_FAILED
    assert "Stage teacher of generation 0" in failed.message and world.name(Stage(0, TEACHER), 2) in failed.message
    assert world.status.stage == "Failed"
    # A failed run stays failed.
    assert world.step(seconds=3600).actions == []


def test_success_without_marker_is_a_failure():
    world = World(make_run(retry={"limit": 0}))
    world.step()
    world.jobs[world.name(Stage(0, TEACHER))] = JobObservation(JobState.SUCCEEDED)
    world.step()
    failed = get_condition(world.status.conditions, reasons.FAILED)
    assert failed.status == "True" and "no completion marker" in failed.message


def test_marker_written_but_job_still_exiting_waits():
    world = World(make_run())
    world.step()
    world.mark(Stage(0, TEACHER), {"metrics": {"top1": 0.5, "parameters": 1}})
    assert world.step().actions == []
    world.jobs[world.name(Stage(0, TEACHER))] = JobObservation(JobState.SUCCEEDED)
    assert [a.request.name for a in world.step().actions] == [world.name(Stage(1, LABEL))]


def test_restart_resumes_from_markers_without_redoing_stages():
    """A driver that lost all state (new process, no status) re-derives progress from markers."""
    world = World(make_run())
    world.mark(Stage(0, TEACHER), {"metrics": {"top1": 0.7, "parameters": 5}})
    world.mark(Stage(1, LABEL), {})
    plan = world.step()
    assert [a.request.name for a in plan.actions] == [world.name(Stage(1, BALANCE))]
    assert world.status.generations[0].top1 == 0.7


def test_missing_job_is_resubmitted_under_the_same_name():
    world = World(make_run())
    world.step()
    world.jobs[world.name(Stage(0, TEACHER))] = JobObservation(JobState.MISSING)
    plan = world.step()
    assert [a.request.name for a in plan.actions] == [world.name(Stage(0, TEACHER))]
    assert [j.name for j in world.status.jobs] == [world.name(Stage(0, TEACHER))]


def test_suspend_cancels_and_resume_continues_as_new_attempt():
    spec = make_run()
    world = World(spec)
    world.step()
    world.spec = spec.model_copy(update={"suspend": True})
    plan = world.step()
    assert [a.job.name for a in plan.actions if isinstance(a, Cancel)] == [world.name(Stage(0, TEACHER))]
    assert world.status.stage == "Suspended"
    assert is_true(world.status.conditions, reasons.SUSPENDED)
    assert world.step().actions == []
    world.spec = spec
    plan = world.step()
    assert [a.request.name for a in plan.actions] == [world.name(Stage(0, TEACHER), 1)]
    assert not is_true(world.status.conditions, reasons.SUSPENDED)
    assert not is_true(world.status.conditions, reasons.FAILED)


def test_condition_transition_time_moves_only_on_flip():
    world = World(make_run())
    world.step()
    first = get_condition(world.status.conditions, reasons.PROGRESSING).last_transition_time
    world.step(seconds=30)
    assert get_condition(world.status.conditions, reasons.PROGRESSING).last_transition_time == first
    assert world.status.observed_generation == 1


def test_teacher_without_noise_and_student_with_noise():
    world = World(make_run(teacher={"model": "resnet18", "noise": False}))
    plan = world.step()
    noise = plan.actions[0].request.config["noise"]
    assert noise == {"rand_augment": None, "dropout": 0.0, "stochastic_depth": 0.0}


def test_failed_run_retries_after_a_spec_change():
    spec = make_run(retry={"limit": 0})
    world = World(spec)
    world.step()
    old = world.name(Stage(0, TEACHER))
    world.jobs[old] = JobObservation(JobState.FAILED, "bad learning rate")
    world.step()
    assert world.status.stage == "Failed"
    assert world.step(seconds=60).actions == []  # same spec: stays failed
    world.spec = spec.model_copy(update={"training": spec.training.model_copy(update={"learning_rate": 0.01})})
    world.generation = 2
    plan = world.step()
    # A new learning rate is a new teacher: a new key, a new job, a fresh budget.
    new = world.name(Stage(0, TEACHER))
    assert new != old and [a.request.name for a in plan.actions] == [new]
    assert plan.actions[0].request.config["lr"] == 0.01
    assert any(e.reason == reasons.SPEC_CHANGED for e in plan.events)
    assert not is_true(world.status.conditions, reasons.FAILED)
    assert world.status.observed_generation == 2
    # The fresh budget is spent like the first one: one more failure fails the run again.
    world.jobs[new] = JobObservation(JobState.FAILED, "still bad")
    world.step()
    assert world.status.stage == "Failed"


def test_spec_change_that_keeps_the_key_retries_the_same_stage_as_a_new_attempt():
    spec = make_run(retry={"limit": 0})
    world = World(spec)
    world.step()
    world.jobs[world.name(Stage(0, TEACHER))] = JobObservation(JobState.FAILED, "node lost")
    world.step()
    assert world.status.stage == "Failed"
    world.spec = spec.model_copy(update={"retry": spec.retry.model_copy(update={"limit": 3})})
    world.generation = 2
    plan = world.step()
    assert [a.request.name for a in plan.actions] == [world.name(Stage(0, TEACHER), 1)]


def run_through(world, top1):
    """Finish each submitted job at once; a training stage of generation g reports `top1[g]`."""
    for _ in range(40):
        plan = world.step()
        if world.status.stage == "Succeeded":
            return plan
        for action in plan.actions:
            stage = action.request.stage
            world.finish(action.request.name, stage, top1=top1.get(stage.generation))
    raise AssertionError(f"the run did not finish: {world.status.stage}")


def test_stop_when_gain_below_skips_the_later_generations_and_exports():
    world = World(make_run(students=4, stopWhenGainBelow=0.01))
    events = []
    top1 = {0: 0.80, 1: 0.85, 2: 0.855, 3: 0.90, 4: 0.95}  # generation 2 gains 0.005 < 0.01
    for _ in range(40):
        plan = world.step()
        events += plan.events
        if world.status.stage == "Succeeded":
            break
        for action in plan.actions:
            stage = action.request.stage
            world.finish(action.request.name, stage, top1=top1.get(stage.generation))
    assert world.status.stage == "Succeeded" and world.status.stopped_after == 2
    assert [g.generation for g in world.status.generations] == [0, 1, 2]
    assert not [g for g in (3, 4) for k in (LABEL, BALANCE, STUDENT) if world.name(Stage(g, k)) in world.submitted]
    assert world.submitted[-1] == world.name(Stage(4, EXPORT))  # the export still runs
    states = {(s.stage, s.generation): s.state for s in world.status.stages}
    for generation in (3, 4):
        for kind in (LABEL, BALANCE, STUDENT):
            assert states[(kind, generation)] == "Skipped"
    assert states[(EXPORT, 4)] == "Complete" and states[(STUDENT, 2)] == "Complete"
    stopped = [e for e in events if e.reason == reasons.STOPPED_EARLY]
    assert len(stopped) == 1 and "generation 2 gained +0.0050" in stopped[0].message
    assert "stopWhenGainBelow (0.01)" in stopped[0].message and "generations 3 to 4" in stopped[0].message
    succeeded = get_condition(world.status.conditions, reasons.SUCCEEDED)
    assert succeeded.status == "True" and "Stopped after generation 2" in succeeded.message
    assert not is_true(world.status.conditions, reasons.FAILED)
    assert world.step().actions == [] and not [e for e in world.step().events if e.reason == reasons.STOPPED_EARLY]


def test_gain_at_or_above_the_threshold_trains_every_generation():
    world = World(make_run(students=2, stopWhenGainBelow=0.01))
    run_through(world, {0: 0.80, 1: 0.81, 2: 0.815})  # the last student's gain does not matter
    assert world.status.stopped_after is None
    assert [g.generation for g in world.status.generations] == [0, 1, 2]
    assert {s.state for s in world.status.stages} == {"Complete"}


def test_status_carries_the_progress_of_the_running_training_stage():
    world = World(make_run(students=1))
    world.step()  # the teacher's job runs
    teacher = Stage(0, TEACHER)
    written = {"epoch": 2.5, "epochs": 10, "images_per_second": 812.4, "eta_seconds": 252, "top1": 0.61,
               "updated": "2026-01-01T00:00:05+00:00"}
    run = RunRef("demo", "ml", world.spec, world.status, world.generation)
    plan = plan_run(run, Observation(world.now, dict(world.jobs), world.markers(), progress={teacher: written}))
    progress = plan.status.progress
    assert (progress.stage, progress.generation, progress.epoch, progress.epochs) == (TEACHER, 0, 2.5, 10)
    assert (progress.percent, progress.eta, progress.images_per_second, progress.top1) == (25, "4m12s", 812.4, 0.61)
    assert plan.status.to_api()["progress"]["etaSeconds"] == 252
    # Once the stage is complete, the next stage (labeling) has written no progress yet: none.
    world.finish(world.name(teacher), teacher, top1=0.7)
    plan = plan_run(RunRef("demo", "ml", world.spec, plan.status, world.generation),
                    Observation(world.now, dict(world.jobs), world.markers(), progress={teacher: written}))
    assert plan.status.stage == "Labeling" and plan.status.progress is None


def test_a_waiting_job_says_why_and_fails_the_run_after_pending_timeout():
    world = World(make_run(pendingTimeoutSeconds=60))
    world.step()
    teacher = world.name(Stage(0, TEACHER))
    world.jobs[teacher] = JobObservation(JobState.PENDING, "pod x: ImagePullBackOff: Back-off pulling image")
    plan = world.step(10)
    progressing = get_condition(plan.status.conditions, reasons.PROGRESSING)
    assert progressing.reason == reasons.JOB_PENDING and "ImagePullBackOff" in progressing.message
    assert get_condition(plan.status.conditions, reasons.READY).reason == reasons.JOB_PENDING
    plan = world.step(60)
    failed = get_condition(plan.status.conditions, reasons.FAILED)
    assert failed.status == "True" and failed.reason == reasons.PENDING_TIMEOUT
    assert "pendingTimeoutSeconds (60s)" in failed.message and "ImagePullBackOff" in failed.message
    assert world.cancelled == [teacher]
    assert [j.state for j in plan.status.jobs] == ["Cancelling"]
    plan = world.step()  # the cancel is confirmed even though the run has failed
    assert [j.state for j in plan.status.jobs] == ["Cancelled"]


def test_a_job_running_past_active_deadline_is_cancelled_and_fails_the_run():
    world = World(make_run(activeDeadlineSeconds=3600))
    world.step()
    plan = world.step(3000)
    assert not is_true(plan.status.conditions, reasons.FAILED)
    plan = world.step(601)
    failed = get_condition(plan.status.conditions, reasons.FAILED)
    assert failed.reason == reasons.DEADLINE_EXCEEDED and "activeDeadlineSeconds (3600s)" in failed.message
    assert world.cancelled == [world.name(Stage(0, TEACHER))]


def test_disruptions_are_retried_at_once_on_their_own_budget():
    world = World(make_run(retry={"limit": 0, "disruptionLimit": 2}))
    world.step()
    for attempt in range(3):
        name = world.name(Stage(0, TEACHER), attempt)
        world.jobs[name] = JobObservation(JobState.FAILED, f"pod {name}-teacher-0-0 was disrupted (Evicted)",
                                          reasons.DISRUPTED)
        plan = world.step()
        if attempt < 2:  # retried at once, and retry.limit 0 is not used up
            assert world.submitted[-1] == world.name(Stage(0, TEACHER), attempt + 1)
            assert [e.reason for e in plan.events if e.type == "Warning"] == [reasons.JOB_DISRUPTED]
            assert not is_true(plan.status.conditions, reasons.FAILED)
    failed = get_condition(plan.status.conditions, reasons.FAILED)
    assert failed.status == "True" and failed.reason == reasons.TOO_MANY_DISRUPTIONS


def test_a_job_aborted_outside_the_operator_is_a_disruption():
    world = World(make_run(retry={"limit": 0}))
    world.step()
    world.jobs[world.name(Stage(0, TEACHER))] = JobObservation(JobState.CANCELLED)
    world.step()
    assert world.submitted[-1] == world.name(Stage(0, TEACHER), 1)
    assert [j.reason for j in world.status.jobs] == [reasons.DISRUPTED, None]


def test_a_configuration_error_is_not_retried():
    world = World(make_run(retry={"limit": 5}))
    world.step()
    world.jobs[world.name(Stage(0, TEACHER))] = JobObservation(
        JobState.FAILED, "pod x container teacher exited with code 2 (Error): ConfigError: ...", reasons.INVALID_CONFIG)
    plan = world.step()
    failed = get_condition(plan.status.conditions, reasons.FAILED)
    assert failed.status == "True" and failed.reason == reasons.INVALID_CONFIG and "ConfigError" in failed.message
    assert len(world.submitted) == 1
