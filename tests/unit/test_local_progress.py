"""The local runner's progress bars: one per stage, filled from `status.progress` (training epochs, label images)."""

import io

from rich.console import Console

from noisy_student_operator.api import JobStatus, ProgressStatus, RunStatus, parse_run
from noisy_student_operator.core.layout import LABEL, TEACHER, Stage
from noisy_student_operator.local import RunProgress


def test_bars_follow_the_label_stages_images_and_the_training_epochs():
    run = parse_run({"apiVersion": "noisystudent.dev/v1alpha1", "kind": "NoisyStudentRun",
                     "metadata": {"name": "demo", "namespace": "ml"},
                     "spec": {"data": {"labeled": "file:///d/l.tar", "unlabeled": "file:///d/u.tar",
                                       "validation": "file:///d/v.tar", "numClasses": 10},
                              "artifacts": {"uri": "file:///tmp/a/"}, "teacher": {"model": "resnet18", "epochs": 4},
                              "students": [{"model": "resnet18"}]}})
    out = io.StringIO()
    bars = RunProgress(Console(file=out, width=200, force_terminal=False), run)
    teacher, label = Stage(0, TEACHER), Stage(1, LABEL)
    jobs = [JobStatus(name="t", stage=TEACHER, generation=0, state="Running")]
    status = RunStatus(jobs=jobs, progress=ProgressStatus(stage=TEACHER, generation=0, epoch=2.5, epochs=4,
                                                         percent=62, images_per_second=90.0, eta="4s"))
    bars.update(status, set())
    assert bars.progress.tasks[0].completed == 2.5 and bars.progress.tasks[0].total == 4
    jobs.append(JobStatus(name="l", stage=LABEL, generation=1, state="Running"))
    status = RunStatus(jobs=jobs, progress=ProgressStatus(stage=LABEL, generation=1, images=300, images_total=1000,
                                                         percent=30, images_per_second=50.0, eta="14s"))
    bars.update(status, {teacher})  # every later stage is still looked at after the label's bar
    label_bar = bars.progress.tasks[1]
    assert label_bar.completed == 0.3 and label_bar.total == 1
    assert label_bar.fields["note"] == "300/1000 images  50 img/s  ETA 14s"
    assert bars.progress.tasks[0].completed == 4  # done
    bars.update(RunStatus(jobs=jobs), {teacher, label})
    assert bars.progress.tasks[1].completed == 1
