"""The pure planner: transitions, retries with backoff, suspend, resume after a restart."""

from datetime import datetime, timedelta, timezone

from noisy_student_operator.api import RunStatus, parse_run
from noisy_student_operator.core import reasons
from noisy_student_operator.core.conditions import get_condition, is_true
from noisy_student_operator.core.layout import BALANCE, LABEL, PREPARE, STUDENT, TEACHER, Stage
from noisy_student_operator.core.planner import (
    Cancel,
    JobObservation,
    JobState,
    Observation,
    RunRef,
    Submit,
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
        self.markers: dict[Stage, dict] = {}
        self.now = T0
        self.generation = generation
        self.submitted: list[str] = []
        self.cancelled: list[str] = []

    def step(self, seconds=1.0):
        self.now += timedelta(seconds=seconds)
        run = RunRef("demo", "ml", self.spec, self.status, self.generation)
        plan = plan_run(run, Observation(self.now, dict(self.jobs), dict(self.markers)))
        for action in plan.actions:
            if isinstance(action, Submit):
                self.submitted.append(action.request.name)
                self.jobs[action.request.name] = JobObservation(JobState.RUNNING)
            elif isinstance(action, Cancel):
                self.cancelled.append(action.job.name)
                self.jobs[action.job.name] = JobObservation(JobState.CANCELLED)
        self.status = plan.status
        return plan

    def finish(self, name, stage, top1=None, parameters=100):
        self.jobs[name] = JobObservation(JobState.SUCCEEDED)
        marker = {"stage": stage.kind}
        if stage.is_training:
            marker["metrics"] = {"top1": top1, "top5": 0.99, "parameters": parameters}
        if stage.kind == BALANCE:
            marker["metrics"] = {"images": 1234}
        self.markers[stage] = marker


def test_happy_path_walks_every_stage_and_promotes():
    world = World(make_run(students=2))
    plan = world.step()
    assert [a.request.name for a in plan.actions] == ["demo-g0-teacher"]
    assert world.status.stage == "Training" and world.status.generation == 0
    assert is_true(world.status.conditions, reasons.PROGRESSING)

    world.finish("demo-g0-teacher", Stage(0, TEACHER), top1=0.8)
    plan = world.step()
    assert [a.request.name for a in plan.actions] == ["demo-g1-label"]
    assert world.status.stage == "Labeling" and world.status.teacher_top1 == 0.8
    label = plan.actions[0].request
    assert label.config["checkpoint"] == "s3://runs/ml/demo/gen-0/teacher/checkpoint.pt"
    assert label.args["replicas"] == 1

    world.finish("demo-g1-label", Stage(1, LABEL))
    plan = world.step()
    assert [a.request.name for a in plan.actions] == ["demo-g1-balance"]
    world.finish("demo-g1-balance", Stage(1, BALANCE))
    plan = world.step()
    student = plan.actions[0].request
    assert student.name == "demo-g1-student"
    assert student.config["teacher"] == {"model": "resnet18", "parameters": 100}
    assert student.config["pseudo"]["manifest"] == "s3://runs/ml/demo/gen-1/balance/manifest.npz"
    assert student.config["noise"]["rand_augment"] == {"ops": 2, "magnitude": 9}

    world.finish("demo-g1-student", Stage(1, STUDENT), top1=0.85)
    plan = world.step()
    assert any(e.reason == reasons.PROMOTED for e in plan.events)
    assert plan.actions[0].request.config["checkpoint"].endswith("gen-1/student/checkpoint.pt")
    assert world.status.teacher_top1 == 0.85
    assert world.status.generations[1].images_used == 1234

    for kind in (LABEL, BALANCE, STUDENT):
        world.finish(f"demo-g2-{kind}", Stage(2, kind), top1=0.87)
        plan = world.step()
    assert world.status.stage == "Succeeded"
    assert is_true(world.status.conditions, reasons.SUCCEEDED)
    assert is_true(world.status.conditions, reasons.READY)
    assert not is_true(world.status.conditions, reasons.PROGRESSING)
    assert [g.top1 for g in world.status.generations] == [0.8, 0.85, 0.87]
    assert world.submitted == [
        "demo-g0-teacher", "demo-g1-label", "demo-g1-balance", "demo-g1-student",
        "demo-g2-label", "demo-g2-balance", "demo-g2-student",
    ]
    # Once finished, nothing more happens.
    assert world.step().actions == []


def test_waits_while_running_and_never_submits_twice():
    world = World(make_run())
    world.step()
    for _ in range(5):
        assert world.step().actions == []
    assert world.submitted == ["demo-g0-teacher"]


def test_prepare_stage_comes_first_when_requested():
    spec = make_run(data={"numClasses": 10, "prepare": {"source": "digits", "labelsPerClass": 5}})
    world = World(spec)
    plan = world.step()
    request = plan.actions[0].request
    assert request.name == "demo-g0-prepare" and request.component == "prepare"
    assert request.args["output"] == "s3://runs/ml/demo/data/"
    assert world.status.stage == "Preparing"
    world.finish("demo-g0-prepare", Stage(0, PREPARE))
    plan = world.step()
    assert plan.actions[0].request.config["labeled"] == "s3://runs/ml/demo/data/labeled-*.tar"


def test_failure_retries_with_exponential_backoff_then_fails():
    world = World(make_run(retry={"limit": 2, "backoffSeconds": 10}))
    world.step()
    world.jobs["demo-g0-teacher"] = JobObservation(JobState.FAILED, "OOMKilled")
    plan = world.step()
    assert plan.actions == [] and plan.requeue_after == 10
    assert world.status.next_retry_at is not None
    assert get_condition(world.status.conditions, reasons.PROGRESSING).reason == reasons.WAITING_FOR_RETRY
    assert any(e.type == "Warning" and "OOMKilled" in e.message for e in plan.events)
    assert world.step(seconds=5).actions == []
    plan = world.step(seconds=5)
    assert [a.request.name for a in plan.actions] == ["demo-g0-teacher-1"]

    world.jobs["demo-g0-teacher-1"] = JobObservation(JobState.FAILED, "OOMKilled")
    plan = world.step()
    assert plan.requeue_after == 20  # doubled
    plan = world.step(seconds=20)
    assert [a.request.name for a in plan.actions] == ["demo-g0-teacher-2"]

    world.jobs["demo-g0-teacher-2"] = JobObservation(JobState.FAILED, "OOMKilled")
    plan = world.step()
    assert plan.actions == []
    failed = get_condition(world.status.conditions, reasons.FAILED)
    assert failed.status == "True" and failed.reason == reasons.STAGE_FAILED
    assert "Stage teacher of generation 0" in failed.message and "demo-g0-teacher-2" in failed.message
    assert world.status.stage == "Failed"
    # A failed run stays failed.
    assert world.step(seconds=3600).actions == []


def test_success_without_marker_is_a_failure():
    world = World(make_run(retry={"limit": 0}))
    world.step()
    world.jobs["demo-g0-teacher"] = JobObservation(JobState.SUCCEEDED)
    world.step()
    failed = get_condition(world.status.conditions, reasons.FAILED)
    assert failed.status == "True" and "no completion marker" in failed.message


def test_marker_written_but_job_still_exiting_waits():
    world = World(make_run())
    world.step()
    world.markers[Stage(0, TEACHER)] = {"metrics": {"top1": 0.5, "parameters": 1}}
    assert world.step().actions == []
    world.jobs["demo-g0-teacher"] = JobObservation(JobState.SUCCEEDED)
    assert [a.request.name for a in world.step().actions] == ["demo-g1-label"]


def test_restart_resumes_from_markers_without_redoing_stages():
    """A driver that lost all state (new process, no status) re-derives progress from markers."""
    world = World(make_run())
    world.markers[Stage(0, TEACHER)] = {"metrics": {"top1": 0.7, "parameters": 5}}
    world.markers[Stage(1, LABEL)] = {}
    plan = world.step()
    assert [a.request.name for a in plan.actions] == ["demo-g1-balance"]
    assert world.status.generations[0].top1 == 0.7


def test_missing_job_is_resubmitted_under_the_same_name():
    world = World(make_run())
    world.step()
    world.jobs["demo-g0-teacher"] = JobObservation(JobState.MISSING)
    plan = world.step()
    assert [a.request.name for a in plan.actions] == ["demo-g0-teacher"]
    assert [j.name for j in world.status.jobs] == ["demo-g0-teacher"]


def test_suspend_cancels_and_resume_continues_as_new_attempt():
    spec = make_run()
    world = World(spec)
    world.step()
    world.spec = spec.model_copy(update={"suspend": True})
    plan = world.step()
    assert [a.job.name for a in plan.actions if isinstance(a, Cancel)] == ["demo-g0-teacher"]
    assert world.status.stage == "Suspended"
    assert is_true(world.status.conditions, reasons.SUSPENDED)
    assert world.step().actions == []
    world.spec = spec
    plan = world.step()
    assert [a.request.name for a in plan.actions] == ["demo-g0-teacher-1"]
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
    world.jobs["demo-g0-teacher"] = JobObservation(JobState.FAILED, "bad learning rate")
    world.step()
    assert world.status.stage == "Failed"
    assert world.step(seconds=60).actions == []  # same spec: stays failed
    world.spec = spec.model_copy(update={"training": spec.training.model_copy(update={"learning_rate": 0.01})})
    world.generation = 2
    plan = world.step()
    assert [a.request.name for a in plan.actions] == ["demo-g0-teacher-1"]
    assert plan.actions[0].request.config["lr"] == 0.01
    assert any(e.reason == reasons.SPEC_CHANGED for e in plan.events)
    assert not is_true(world.status.conditions, reasons.FAILED)
    assert world.status.observed_generation == 2
    # The fresh budget is spent like the first one: one more failure fails the run again.
    world.jobs["demo-g0-teacher-1"] = JobObservation(JobState.FAILED, "still bad")
    world.step()
    assert world.status.stage == "Failed"
