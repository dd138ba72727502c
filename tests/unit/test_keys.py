"""Stage keys: what enters them, and what a spec change reruns (pure planner, scripted world)."""

from __future__ import annotations

import pytest
from test_planner import World, make_run

from noisy_student_operator.api import RunSpec, RunStatus, parse_run
from noisy_student_operator.core import reasons
from noisy_student_operator.core.conditions import is_true
from noisy_student_operator.core.keys import workload_identity
from noisy_student_operator.core.layout import (
    BALANCE, EXPORT, LABEL, PREPARE, STUDENT, TEACHER, RunLayout, Stage, plan_stages,
)
from noisy_student_operator.core.planner import Cancel, JobObservation, JobState


def keys(spec, namespace="ml", name="demo", scheduler=None):
    return RunLayout.for_run(spec, namespace, name, workload_identity(spec, scheduler or spec.scheduler.name)).keys


def changed(before, after):
    return sorted((s.generation, s.kind) for s in before if before[s] != after.get(s))


def edit(spec, **updates):
    """`spec` with some top-level fields replaced by (camelCase) documents."""
    document = spec.to_api()
    for path, value in updates.items():
        target = document
        *parents, last = path.split(".")
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        target[int(last) if last.isdigit() else last] = value
    return parse_run({"apiVersion": "noisystudent.dev/v1alpha1", "kind": "NoisyStudentRun",
                      "metadata": {"name": "demo", "namespace": "ml"}, "spec": document}).spec


ALL_OF_GEN_2 = [(2, LABEL), (2, BALANCE), (2, STUDENT)]
#: The export reads every generation's training output: any change of them changes its key.
EXPORTED = [(2, EXPORT)]


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        # Fields that cannot change a result stay out of every key.
        ("suspend", True, []),
        ("retry.limit", 7, []),
        ("scheduler.queue", "research", []),
        ("resources.cpu", 16, []),
        ("resources.memoryMiB", 65536, []),
        # A guard: it lets a smaller student run or refuses it, and changes no training; only the export, whose
        # report shows the recipe, runs again.
        ("training.allowSmallerStudent", True, EXPORTED),
        # The teacher: everything downstream of it.
        ("teacher.epochs", 3, [(0, TEACHER), (1, LABEL), (1, BALANCE), (1, STUDENT), *ALL_OF_GEN_2, *EXPORTED]),
        ("teacher.model", "resnet34", [(0, TEACHER), (1, LABEL), (1, BALANCE), (1, STUDENT), *ALL_OF_GEN_2, *EXPORTED]),
        ("teacher.modelArgs", {"output_stride": 8},
         [(0, TEACHER), (1, LABEL), (1, BALANCE), (1, STUDENT), *ALL_OF_GEN_2, *EXPORTED]),
        ("training.emaDecay", 0.999, [(0, TEACHER), (1, LABEL), (1, BALANCE), (1, STUDENT), *ALL_OF_GEN_2, *EXPORTED]),
        ("training.labelSmoothing", 0.0,
         [(0, TEACHER), (1, LABEL), (1, BALANCE), (1, STUDENT), *ALL_OF_GEN_2, *EXPORTED]),
        ("training.horizontalFlip", True,
         [(0, TEACHER), (1, LABEL), (1, BALANCE), (1, STUDENT), *ALL_OF_GEN_2, *EXPORTED]),
        ("training.horizontalFlip", False, []),  # the default: rendered only when set, so old keys stay
        # The pseudo-labeled batch and its loss: the students, never the teacher (it has neither).
        ("training.unlabeledRatio", 5, [(1, STUDENT), *ALL_OF_GEN_2, *EXPORTED]),
        ("training.unlabeledLossWeight", "equal", [(1, STUDENT), *ALL_OF_GEN_2, *EXPORTED]),
        # The last student only.
        ("students.1.epochs", 3, [(2, STUDENT), *EXPORTED]),
        ("students.1.modelArgs", {"output_stride": 16}, [(2, STUDENT), *EXPORTED]),
        ("students.1.noise", {"dropout": 0.1}, [(2, STUDENT), *EXPORTED]),
        ("students.1.init", "teacher", [(2, STUDENT), *EXPORTED]),
        ("students.1.init", "scratch", []),  # the default: rendered only when it is the teacher, so old keys stay
        # Pseudo labels: balancing and the students, never the teacher or the labels.
        ("pseudoLabels.confidenceThreshold", 0.5, [(1, BALANCE), (1, STUDENT), *ALL_OF_GEN_2, *EXPORTED]),
        ("pseudoLabels.type", "hard", [(1, STUDENT), *ALL_OF_GEN_2, *EXPORTED]),
        ("resources.labelShards", 4, [(1, LABEL), (1, BALANCE), (1, STUDENT), *ALL_OF_GEN_2, *EXPORTED]),
        # Where to stop: which generation the export chooses from.
        ("stopWhenGainBelow", 0.01, EXPORTED),
        # Where outputs live and what computes them: every stage.
        ("artifacts.uri", "s3://elsewhere/",
         [(0, TEACHER), (1, LABEL), (1, BALANCE), (1, STUDENT), *ALL_OF_GEN_2, *EXPORTED]),
        # External data by URL: the teacher never reads the unlabeled shards.
        ("data.unlabeled", "s3://d/other-{0..3}.tar",
         [(1, LABEL), (1, BALANCE), (1, STUDENT), *ALL_OF_GEN_2, *EXPORTED]),
        ("data.labeled", "s3://d/more.tar",
         [(0, TEACHER), (1, LABEL), (1, BALANCE), (1, STUDENT), *ALL_OF_GEN_2, *EXPORTED]),
    ],
)
def test_a_field_changes_exactly_the_keys_of_the_stages_it_affects(path, value, expected):
    spec = make_run()
    assert changed(keys(spec), keys(edit(spec, **{path: value}))) == sorted(expected)


@pytest.mark.parametrize("change", ["levels", "images", "set"])
def test_the_robustness_checks_corruptions_enter_the_keys_of_the_stages_that_score_them(monkeypatch, request, change):
    """The corruption table and image count are workload defaults that the operator renders into every training
    config: changing them (a new workload version, or an edit) reruns the training stages and what follows."""
    from noisy_student_operator.core import render
    from noisy_student_workloads import config

    spec = make_run()
    before = keys(spec)
    if change == "levels":
        monkeypatch.setitem(config.CORRUPTIONS, "gaussian_noise", (0.1, 0.2, 0.4))
    elif change == "images":
        monkeypatch.setattr(render, "CORRUPTION_IMAGES", 500)
    else:
        monkeypatch.delitem(config.CORRUPTIONS, "pixelate")
    render.forget_layouts()  # a process's workload defaults are constants: layouts are kept
    request.addfinalizer(render.forget_layouts)
    assert changed(before, keys(spec)) == sorted(
        [(0, TEACHER), (1, LABEL), (1, BALANCE), (1, STUDENT), *ALL_OF_GEN_2, *EXPORTED])


def test_keys_are_namespace_scoped_and_ignore_the_run_name():
    spec = make_run()
    assert keys(spec, name="one") == keys(spec, name="two")
    assert keys(spec, namespace="a")[Stage(0, TEACHER)] != keys(spec, namespace="b")[Stage(0, TEACHER)]


def test_the_image_enters_cluster_keys_and_the_package_version_local_ones():
    spec = make_run()
    other_image = edit(spec, **{"resources.image": "registry.example/workloads:0.2.0"})
    assert changed(keys(spec, scheduler="kubernetes"), keys(other_image, scheduler="kubernetes")) == sorted(
        (s.generation, s.kind) for s in plan_stages(spec))
    assert keys(spec, scheduler="local_cwd") == keys(other_image, scheduler="local_cwd")
    assert keys(spec, scheduler="local_cwd") != keys(spec, scheduler="kubernetes")


def test_prepared_data_is_an_input_of_the_teacher():
    spec = make_run(data={"numClasses": 10, "prepare": {"source": "digits", "labelsPerClass": 5}})
    before = keys(spec)
    after = keys(edit(spec, **{"data.prepare.labelsPerClass": 6}))
    assert Stage(0, PREPARE) in before
    assert changed(before, after) == sorted((s.generation, s.kind) for s in plan_stages(spec))
    # the split protocol changes what prepare writes: a new key for every stage
    assert changed(before, keys(edit(spec, **{"data.prepare.testSplit": False}))) == changed(before, after)


def run_to_the_end(world):
    """Step until Succeeded, finishing every job as soon as it runs."""
    for _ in range(20):
        world.step()
        if world.status.stage == "Succeeded":
            return
        for job in world.status.jobs:
            if world.jobs.get(job.name) == JobObservation(JobState.RUNNING):
                stage = Stage(job.generation, job.stage)
                world.finish(job.name, stage, top1=0.5 + 0.1 * job.generation)
    raise AssertionError(f"the run did not finish: {world.status.stage}")


def test_an_edit_after_succeeded_reruns_exactly_the_changed_stages():
    world = World(make_run(students=2))
    run_to_the_end(world)
    first = list(world.submitted)
    assert is_true(world.status.conditions, reasons.SUCCEEDED)

    world.spec = edit(world.spec, **{"students.1.epochs": 3})
    world.generation = 2
    plan = world.step()
    assert [a.request.name for a in plan.actions] == [world.name(Stage(2, STUDENT))]
    assert not is_true(world.status.conditions, reasons.SUCCEEDED)  # describes the current spec
    assert world.status.observed_generation == 2
    run_to_the_end(world)
    assert world.submitted[len(first):] == [world.name(Stage(2, STUDENT)), world.name(Stage(2, EXPORT))]

    world.spec = edit(world.spec, **{"teacher.epochs": 2})
    world.generation = 3
    before = len(world.submitted)
    run_to_the_end(world)
    kinds = [n.split("-")[0] for n in world.submitted[before:]]
    assert kinds == ["teacher", "label", "balance", "student", "label", "balance", "student", "export"]


def test_a_recreated_run_with_another_teacher_trains_it_and_reports_its_metrics():
    world = World(make_run(students=1))
    run_to_the_end(world)
    assert world.status.generations[0].model == "resnet18"

    # Deleted and created again under the same name: no status, the old markers stay in the store.
    world.spec = edit(world.spec, **{"teacher.model": "resnet34"})
    world.status = RunStatus()
    plan = world.step()
    assert [a.request.name for a in plan.actions] == [world.name(Stage(0, TEACHER))]
    world.finish(world.name(Stage(0, TEACHER)), Stage(0, TEACHER), top1=0.77, parameters=21_000_000)
    world.step()
    teacher = world.status.generations[0]
    assert (teacher.model, teacher.top1, teacher.parameters) == ("resnet34", 0.77, 21_000_000)
    assert teacher.key == world.layout.key(Stage(0, TEACHER))


def test_an_artifacts_uri_edit_runs_the_stages_at_the_new_location_without_a_failure():
    world = World(make_run(students=1))
    run_to_the_end(world)
    world.spec = edit(world.spec, **{"artifacts.uri": "s3://moved/"})
    world.generation = 2
    plan = world.step()
    assert not is_true(world.status.conditions, reasons.FAILED)
    request = plan.actions[0].request
    assert request.stage == Stage(0, TEACHER) and request.config["output"].startswith("s3://moved/ml/stages/teacher/")
    run_to_the_end(world)
    assert world.status.artifacts == "s3://moved/ml/demo/"


def test_a_retry_after_a_spec_change_writes_under_the_new_key():
    world = World(make_run(retry={"limit": 3}))
    plan = world.step()
    old_output = plan.actions[0].request.config["output"]
    world.jobs[world.name(Stage(0, TEACHER))] = JobObservation(JobState.FAILED, "diverged")
    world.step()
    world.spec = edit(world.spec, **{"training.learningRate": 0.01})
    world.generation = 2
    plan = world.step(seconds=3600)
    new_output = plan.actions[0].request.config["output"]
    # Epoch checkpoints live under the output: the retry cannot resume the old spec's.
    assert new_output != old_output and plan.actions[0].request.attempt == 0


def test_removing_a_student_while_its_job_runs_cancels_that_job():
    world = World(make_run(students=2))
    running = world.name(Stage(2, LABEL))
    while running not in world.submitted:
        for action in world.step().actions:
            if action.request.name != running:
                world.finish(action.request.name, action.request.stage, top1=0.6)
    assert world.status.stage == "Labeling" and world.jobs[running].state is JobState.RUNNING

    world.spec = edit(world.spec, students=[{"model": "resnet18"}])
    world.generation = 2
    plan = world.step()
    assert [a.job.name for a in plan.actions if isinstance(a, Cancel)] == [running]
    assert world.status.stage == "Exporting"  # the one student left is trained: export the best model
    assert world.submitted[-1] == world.name(Stage(1, EXPORT))
    assert [j.state for j in world.status.jobs if j.name == running] == ["Cancelling"]
    world.step()  # the backend reports it cancelled: confirmed
    assert [j.state for j in world.status.jobs if j.name == running] == ["Cancelled"]


def test_two_runs_with_the_same_teacher_ask_for_one_job_and_share_what_they_share():
    first, second = World(make_run(students=1)), World(make_run(students=2))
    second.store = first.store  # one artifact store
    assert second.name(Stage(0, TEACHER)) == first.name(Stage(0, TEACHER))  # the scheduler starts it once
    run_to_the_end(first)
    plan = second.step()
    reused = [e.message for e in plan.events if e.reason == reasons.STAGE_REUSED]
    assert len(reused) == 4 and "teacher training" in reused[0] and "an earlier run" in reused[0]
    assert [(s.stage, s.generation, s.state) for s in second.status.stages] == [
        (TEACHER, 0, "Reused"), (LABEL, 1, "Reused"), (BALANCE, 1, "Reused"), (STUDENT, 1, "Reused"),
        (LABEL, 2, "Running"), (BALANCE, 2, "Pending"), (STUDENT, 2, "Pending"), (EXPORT, 2, "Pending"),
    ]
    assert second.submitted == [second.name(Stage(2, LABEL))]


def test_a_stage_made_by_another_run_is_reported_as_reused_once():
    first, second = World(make_run(students=1)), World(make_run(students=1))
    second.store = first.store
    run_to_the_end(first)
    for marker in first.store.values():
        marker["run"] = "ml/first"
    plan = second.step()
    assert second.status.stage == "Succeeded" and second.submitted == []
    reused = [e.message for e in plan.events if e.reason == reasons.STAGE_REUSED]
    assert len(reused) == 5 and all("run ml/first" in m for m in reused)
    assert {s.state for s in second.status.stages} == {"Reused"}
    assert {s.produced_by for s in second.status.stages} == {"ml/first"}
    assert not [e for e in second.step().events if e.reason == reasons.STAGE_REUSED]


def test_an_edit_says_what_it_keeps_and_what_it_runs_again():
    world = World(make_run(students=2))
    run_to_the_end(world)
    world.spec = edit(world.spec, **{"students.1.epochs": 3})
    world.generation = 2
    plan = world.step()
    changes = [e.message for e in plan.events if e.reason == reasons.SPEC_CHANGED]
    assert changes == [
        "The spec changed: 2 stage(s) to run (student of generation 2, export of the best model); "
        "kept teacher training, "
        "label of generation 1, balance of generation 1, student of generation 1, label of generation 2, "
        "balance of generation 2."
    ]


def test_a_runs_layout_is_computed_once_per_spec_and_shared_read_only(monkeypatch):
    """A pass computes every stage's key (half of a timer pass's CPU): kept per spec, namespace,
    run name and workload; a spec edit computes them again."""
    from noisy_student_operator.core import render

    calls = []
    compute = render._run_layout
    monkeypatch.setattr(render, "_run_layout", lambda *args: calls.append(args) or compute(*args))
    spec = make_run()
    first = render.run_layout(spec, "ml", "kept", "image:test")
    assert render.run_layout(RunSpec.model_validate(spec.model_dump(by_alias=True)), "ml", "kept", "image:test") is first
    assert len(calls) == 1
    edited = edit(spec, **{"training.seed": 7})
    assert render.run_layout(edited, "ml", "kept", "image:test").keys != first.keys
    assert render.run_layout(spec, "ml", "kept", "image:other").keys != first.keys
    assert len(calls) == 3
    with pytest.raises(TypeError):
        first.keys[Stage(0, TEACHER)] = "0" * 16  # type: ignore[index]
