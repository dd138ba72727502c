"""The efficacy benchmark's pure parts: the supervised budget, the checks and the table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "efficacy.py"


@pytest.fixture(scope="module")
def efficacy():
    spec = importlib.util.spec_from_file_location("efficacy_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def results(default, no_noise=None, gap=0.3):
    variants = {"default": {"change": "—", "top1": default}}
    if no_noise is not None:
        variants["no-noise"] = {"change": "no noise", "top1": no_noise}
    return {
        "variants": variants,
        "references": {"supervised, no noise": {"top1": 0.9}},
        "supervised_top1": 0.9,
        "gap_closed": {"noisy_teacher": gap, "plain_teacher": None},
    }


def test_supervised_budget_sees_as_many_images_as_one_student(efficacy):
    spec = {
        "training": {"unlabeledRatio": 3, "batchSize": 64, "epochs": 6},
        "data": {"numClasses": 10, "prepare": {"labelsPerClass": 100}},
        "students": [{"model": "test_resnet"}, {"model": "test_resnet"}],
    }
    batch, epochs = efficacy.student_budget(spec, pseudo_images=57_600)
    # 300 steps of 64 + 192 images, 6 epochs = 460,800 images ≈ 8 passes over 59,990 labels
    assert (batch, epochs) == (256, 8)
    spec["students"].append({"model": "test_resnet", "epochs": 9})  # the longest student sets the budget
    assert efficacy.student_budget(spec, pseudo_images=57_600) == (256, 12)


def test_checks_pass_when_generations_climb_and_noise_helps(efficacy):
    r = results([0.83, 0.85, 0.855, 0.86], no_noise=[0.83, 0.84], gap=0.55)
    assert efficacy.checks(r) == {"generations_monotone": True, "noise_helps": True, "gap_closed_goal": True}


def test_checks_fail_on_a_dip_a_useless_noise_or_a_small_gap(efficacy):
    r = results([0.83, 0.85, 0.849], no_noise=[0.83, 0.86], gap=0.2)
    assert efficacy.checks(r) == {"generations_monotone": False, "noise_helps": False, "gap_closed_goal": False}


def test_checks_say_not_run_without_the_ablation_or_the_references(efficacy):
    r = results([0.83, 0.85], gap=None)
    assert efficacy.checks(r)["noise_helps"] is None
    assert efficacy.checks(r)["gap_closed_goal"] is None


def test_table_shows_every_generation_and_the_verdicts(efficacy):
    r = results([0.8365, 0.852, 0.8525, 0.859], no_noise=[0.8365, 0.8437], gap=0.293)
    r["checks"] = efficacy.checks(r)
    table = efficacy.render_table(r)
    assert "| default | — | 83.7 | 85.2 | 85.2 | 85.9 |" in table
    assert "| no-noise | no noise | 83.7 | 84.4 |  |  |" in table
    assert "**29.3 %**" in table
    assert "no-noise student below the noisy one: yes" in table
    assert "gap closed ≥ 50%: **no**" in table
