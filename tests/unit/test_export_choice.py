"""The export's choice of generation (pure logic over markers) agrees with the planner's stop rule."""

import json

import pytest

from noisy_student_operator.api import GenerationStatus
from noisy_student_operator.core.planner import duration, plan_stop
from noisy_student_workloads.config import ConfigError, ExportConfig
from noisy_student_workloads.export import best, trained_generations
from test_planner import make_run


def export_config(tmp_path, top1s, threshold, missing=()):
    prefixes = []
    for generation, top1 in enumerate(top1s):
        prefix = tmp_path / f"g{generation}"
        prefix.mkdir()
        if generation not in missing:
            (prefix / "_DONE.json").write_text(json.dumps({"metrics": {"top1": top1, "model": "m"}}))
        prefixes.append(prefix.as_uri() + "/")
    return ExportConfig(generations=prefixes, stop_when_gain_below=threshold, validation="file:///v-*.tar",
                        unlabeled="file:///u-*.tar", num_classes=10, output=(tmp_path / "out").as_uri() + "/")


def test_the_export_stops_where_the_planner_stops_and_picks_the_best(tmp_path):
    top1s = [0.80, 0.85, 0.855, 0.90, 0.95]
    # generations 3 and 4 were skipped: no markers
    trained, stopped_after = trained_generations(export_config(tmp_path, top1s, 0.01, missing=(3, 4)))
    assert [t.generation for t in trained] == [0, 1, 2] and stopped_after == 2
    assert best(trained).generation == 2
    spec = make_run(students=4, stopWhenGainBelow=0.01)
    generations = {g: GenerationStatus(generation=g, model="m", top1=t) for g, t in enumerate(top1s)}
    assert [g for g in range(1, 5) if plan_stop(spec, generations, g)] == [2]  # the first stop is the same


def test_without_a_threshold_every_generation_counts_and_a_tie_keeps_the_earlier(tmp_path):
    trained, stopped_after = trained_generations(export_config(tmp_path, [0.9, 0.95, 0.95], None))
    assert stopped_after is None and best(trained).generation == 1


def test_a_missing_marker_before_any_stop_names_the_generation(tmp_path):
    with pytest.raises(ConfigError, match=r"generations\[1\]: .* has no completion marker"):
        trained_generations(export_config(tmp_path, [0.8, 0.9, 0.95], 0.01, missing=(1,)))


def test_durations_for_kubectl():
    assert [duration(s) for s in (0, 9.4, 72, 3599, 3600 + 5 * 60 + 7)] == ["0s", "9s", "1m12s", "59m59s", "1h05m"]


def test_the_cli_finds_a_runs_stages_under_the_keys_they_were_computed_with(tmp_path):
    from noisy_student_operator.api import parse_run
    from noisy_student_operator.cli import _run_layout
    from noisy_student_operator.core.layout import RunLayout
    from noisy_student_operator.local import StatusFile

    document = {"apiVersion": "noisystudent.dev/v1alpha1", "kind": "NoisyStudentRun", "metadata": {"name": "r"},
                "spec": {"data": {"labeled": "s3://d/l.tar", "unlabeled": "s3://d/u.tar", "validation": "s3://d/v.tar",
                                  "numClasses": 10},
                         "artifacts": {"uri": tmp_path.as_uri() + "/"}, "teacher": {"model": "resnet18"},
                         "students": [{"model": "resnet18"}], "scheduler": {"name": "kubernetes"}}}
    run = parse_run(document)
    cluster = RunLayout.for_run(run.spec, "default", "r")  # the image enters the keys on a cluster
    assert _run_layout(run).keys == cluster.keys
    StatusFile(run).save_manifest()  # the same file run locally: its manifest names the local workload
    assert _run_layout(run).keys == StatusFile(run).layout.keys != cluster.keys
