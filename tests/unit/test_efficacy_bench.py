"""The efficacy benchmark's pure parts: the supervised budget, the checks and the table."""

from __future__ import annotations

import importlib.util
import os
import re
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
    # 300 steps of 64 + 192 images, 6 epochs = 460,800 images ≈ 8.5 passes over 53,990 labels
    assert (batch, epochs) == (256, 9)
    spec["students"].append({"model": "test_resnet", "epochs": 9})  # the longest student sets the budget
    assert efficacy.student_budget(spec, pseudo_images=57_600) == (256, 13)


def test_checks_pass_when_generations_climb_and_noise_helps(efficacy):
    r = results([0.83, 0.85, 0.855, 0.86], no_noise=[0.83, 0.845, 0.846, 0.846], gap=0.55)
    assert efficacy.checks(r) == {"generations_monotone": True, "noise_helps": True, "gap_closed_goal": True}


def test_checks_fail_on_a_dip_a_useless_noise_or_a_small_gap(efficacy):
    r = results([0.83, 0.85, 0.849], no_noise=[0.83, 0.84, 0.86], gap=0.2)
    assert efficacy.checks(r) == {"generations_monotone": False, "noise_helps": False, "gap_closed_goal": False}


def test_the_noise_check_compares_the_last_generations_beyond_their_spread(efficacy):
    """Noise is what lets the generations go on climbing: the check compares the last students of the two
    chains (a first student without noise may match the noisy one), against the spread of that generation."""
    last_below = results([0.83, 0.85, 0.86, 0.87], no_noise=[0.83, 0.851, 0.853, 0.855])
    assert efficacy.checks(last_below)["noise_helps"] is True
    first_below_only = results([0.83, 0.85, 0.86, 0.87], no_noise=[0.83, 0.84, 0.86, 0.871])
    assert efficacy.checks(first_below_only)["noise_helps"] is False
    for name, sd in (("default", 0.02), ("no-noise", 0.001)):
        last_below["variants"][name]["top1_sd"] = [0.0, 0.001, 0.001, sd]
    assert efficacy.checks(last_below)["noise_helps"] is False  # 1.5 points, a spread of 2
    one_generation = results([0.83, 0.85, 0.86, 0.87], no_noise=[0.83, 0.84])  # an older result: its only student
    assert efficacy.checks(one_generation)["noise_helps"] is True


def test_the_students_without_noise_iterate_from_the_defaults_stages_and_the_other_ablations_do_not(efficacy):
    import argparse

    from noisy_student_operator.api import parse_run
    from noisy_student_operator.core.keys import workload_identity
    from noisy_student_operator.core.layout import BALANCE, STUDENT, RunLayout

    args = argparse.Namespace(labels_per_class=100, scale_epochs=1.0, quick=False, device="cpu")
    base = efficacy.default_run(args, Path("/data/fashion-mnist"))

    def keys(run):
        spec = parse_run(run).spec
        return spec, RunLayout.for_run(spec, "default", run["metadata"]["name"],
                                       workload_identity(spec, spec.scheduler.name)).keys

    default_spec, default_keys = keys(base)
    spec, chain = keys(efficacy.variant_run(base, "no-noise"))
    assert len(spec.students) == len(default_spec.students) == 3
    assert all(s.noise.rand_augment is None and s.noise.dropout == 0 == s.noise.stochastic_depth
               for s in spec.students)
    assert [s.epochs for s in spec.students] == [s.epochs for s in default_spec.students]
    # everything up to the first student's data is the default run's; every student is its own
    shared = {stage for stage in chain if default_keys.get(stage) == chain[stage]}
    assert {(s.generation, s.kind) for s in shared} >= {(1, BALANCE)}
    assert not {s for s in shared if s.kind == STUDENT or s.generation > 1}
    spec, _ = keys(efficacy.variant_run(base, "hard"))
    assert len(spec.students) == 1


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
    assert "the last student without noise below the default's by more than the spread: yes" in table
    assert "gap closed ≥ 50%: **no**" in table


def seed_results(seed, default, no_noise, hard, corruption=0.5):
    def variant(change, top1):
        return {"change": change, "top1": top1, "corruption_top1": [corruption] * len(top1)}

    return {"seed": seed, "variants": {"default": variant("—", default), "no-noise": variant("no noise", no_noise),
                                       "hard": variant("hard labels", hard)},
            "references": {"supervised, no noise": {"top1": 0.90 + seed / 1000, "corruption_top1": None}}}


def test_seeds_give_mean_and_sd_per_cell_and_an_ablation_counts_only_beyond_the_spread(efficacy):
    per_seed = [seed_results(0, [0.83, 0.85], [0.83, 0.840], [0.83, 0.848]),
                seed_results(1, [0.84, 0.86], [0.84, 0.845], [0.84, 0.856]),
                seed_results(2, [0.82, 0.87], [0.82, 0.835], [0.82, 0.860])]
    r = {**efficacy.summarise(per_seed), "labels_per_class": 100}
    assert r["variants"]["default"]["top1"] == pytest.approx([0.83, 0.86])
    assert r["variants"]["default"]["top1_sd"] == pytest.approx([0.01, 0.01])
    assert r["references"]["supervised, no noise"]["top1"] == pytest.approx(0.901)
    assert r["references"]["supervised, no noise"]["corruption_top1"] is None
    r["checks"], r["ablations"] = efficacy.checks(r), efficacy.ablation_effects(r)
    # no-noise: 0.840 vs 0.860, 2.0 points below with a spread of 1.0: noise helps
    assert r["checks"]["noise_helps"] is True and r["ablations"]["no-noise"][0]["verdict"] == "hurts"
    # hard: 0.8547 vs 0.860, 0.5 points below, within the spread (hard's sd 0.6, default's 1.0)
    assert r["ablations"]["hard"] == [{"generation": 1, "difference": pytest.approx(-0.00533, abs=1e-5),
                                       "spread": pytest.approx(0.01), "verdict": "within the spread"}]
    table = efficacy.render_table(r)
    assert "| default | — | 83.0 ± 1.0 | 86.0 ± 1.0 |" in table
    assert "Robustness" in table and "| default | — | 50.0 ± 0.0 | 50.0 ± 0.0 |" in table
    assert "hard, student 1: -0.5 (spread 1.0): within the spread" in table


def test_one_seed_judges_no_ablation(efficacy):
    r = efficacy.summarise([seed_results(0, [0.83, 0.85], [0.83, 0.80], [0.83, 0.86])])
    assert r["variants"]["default"]["top1_sd"] == [None, None]
    assert {e["verdict"] for compared in efficacy.ablation_effects(r).values() for e in compared} == {"one seed"}


def test_an_iterated_ablation_is_judged_at_its_first_and_its_last_student(efficacy):
    per_seed = [seed_results(s, [0.83, 0.85 + d, 0.86 + d, 0.87 + d], [0.83, 0.85 + d, 0.855 + d, 0.855 + d],
                             [0.83, 0.85 + d]) for s, d in enumerate((0.0, 0.001, -0.001))]
    effects = efficacy.ablation_effects(efficacy.summarise(per_seed))
    assert [(e["generation"], e["verdict"]) for e in effects["no-noise"]] == [(1, "within the spread"), (3, "hurts")]
    assert [e["generation"] for e in effects["hard"]] == [1]


def test_a_reference_is_reused_only_for_the_same_configuration(efficacy, tmp_path, monkeypatch):
    """References resume under --out by name and configuration: one trained with another recipe is
    never scored as the new one, and is kept for when that recipe comes back."""
    import json

    trained = []

    def train(cmd, log, env, cores=None):  # what the train workload leaves: its metrics, then its marker
        config = json.loads(Path(cmd[-1].removeprefix("file://")).read_text())
        stage = Path(config["output"].removeprefix("file://"))
        trained.append(config["lr"])
        (stage / "metrics.json").write_text(json.dumps({"top1": config["lr"]}))
        (stage / "_DONE.json").write_text("{}")
        return 1.0

    monkeypatch.setattr(efficacy, "run_logged", train)
    assert efficacy.run_direct("ref", {"lr": 0.1}, tmp_path, {})[0] == {"top1": 0.1}
    assert efficacy.run_direct("ref", {"lr": 0.1}, tmp_path, {}) == ({"top1": 0.1}, 0.0)  # kept
    assert efficacy.run_direct("ref", {"lr": 0.2}, tmp_path, {})[0] == {"top1": 0.2}  # trained again
    assert efficacy.run_direct("ref", {"lr": 0.1}, tmp_path, {}) == ({"top1": 0.1}, 0.0)  # the first one, kept
    assert trained == [0.1, 0.2]


def test_slots_split_the_cores_and_hand_the_next_free_set_to_the_most_urgent_waiter(efficacy):
    import threading
    import time

    slots = efficacy.Slots(2, cores=[0, 1, 2, 3, 4])
    assert slots.sets == [[0, 1], [2, 3, 4]]
    assert efficacy.Slots(8, cores=[0, 1]).sets == [[0], [1]]  # never more jobs than cores
    order = []
    with slots.cores(0) as a, slots.cores(0) as b:
        assert sorted(a + b) == [0, 1, 2, 3, 4]

        def wait(priority, name):
            with slots.cores(priority):
                order.append(name)

        threads = [threading.Thread(target=wait, args=(p, n)) for p, n in ((3, "supervised"), (2, "ablation"))]
        for waiting, thread in enumerate(threads, 1):  # both wait, the supervised one first
            thread.start()
            deadline = time.monotonic() + 5
            while len(slots._waiting) < waiting and time.monotonic() < deadline:
                time.sleep(0.01)
        assert order == [] and len(slots._waiting) == 2
    for thread in threads:
        thread.join(5)
    assert order == ["ablation", "supervised"]


def test_jobs_run_at_most_one_per_core_set_after_what_they_need_and_fail_with_it(efficacy):
    import threading
    import time

    jobs = efficacy.Jobs(efficacy.Slots(2, cores=[0, 1]))
    running, most, lock = [], [0], threading.Lock()

    def work(name, seconds=0.2, fail=False):
        def fn(cores):
            with lock:
                running.append(name)
                most[0] = max(most[0], len(running))
            time.sleep(seconds)
            with lock:
                running.remove(name)
            if fail:
                raise SystemExit(f"{name} failed")
            return name, cores
        return fn

    first = jobs.submit("first", 0, work("first"))
    rest = [jobs.submit(f"job {i}", 1, work(f"job {i}")) for i in range(4)]
    after = jobs.submit("after", 0, lambda cores: first.done(), after=(first,))
    assert after.result(5) is True
    assert {f.result(5)[1][0] for f in rest} <= {0, 1} and most[0] == 2
    assert set(jobs.seconds) == {"first", "after", *(f"job {i}" for i in range(4))}
    broken = jobs.submit("broken", 0, work("broken", fail=True))
    downstream = jobs.submit("downstream", 0, work("downstream"), after=(broken,))
    with pytest.raises(SystemExit, match="broken failed"):
        downstream.result(5)
    assert "downstream" not in jobs.seconds


def test_a_stage_wait_believes_only_a_status_written_since_and_fails_when_the_run_ends_without_it(efficacy, tmp_path):
    import concurrent.futures
    import json
    import threading

    status = tmp_path / "status.json"

    def write(state):
        status.write_text(json.dumps({"stages": [{"stage": "balance", "generation": 1, "state": state}]}))

    write("Complete")
    os.utime(status, (1, 1))  # an earlier invocation's: not believed
    run = concurrent.futures.Future()
    waiter = threading.Thread(target=efficacy.wait_for_stage, args=(tmp_path, "balance", 1, run, 0.05))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive()
    write("Running")
    waiter.join(0.3)
    assert waiter.is_alive()
    write("Complete")
    waiter.join(5)
    assert not waiter.is_alive()

    write("Running")
    run.set_result(0.0)
    with pytest.raises(SystemExit, match="ended without its balance stage of generation 1"):
        efficacy.wait_for_stage(tmp_path, "balance", 1, run, 0.05)


def test_a_stage_wait_believes_an_older_status_once_the_run_ended_without_rewriting_it(efficacy, tmp_path):
    """A rerun whose stages are all done ends without writing its status again: what is there is its status."""
    import concurrent.futures
    import json

    status = tmp_path / "status.json"
    status.write_text(json.dumps({"stages": [{"stage": "balance", "generation": 1, "state": "Complete"}]}))
    os.utime(status, (1, 1))
    run = concurrent.futures.Future()
    run.set_result(0.0)
    efficacy.wait_for_stage(tmp_path, "balance", 1, run, 0.05)

    failed = concurrent.futures.Future()
    failed.set_exception(SystemExit("fashion-mnist failed"))
    with pytest.raises(SystemExit, match="fashion-mnist failed"):
        efficacy.wait_for_stage(tmp_path, "balance", 1, failed, 0.05)


def test_a_second_invocation_on_the_machine_is_refused_naming_the_first(efficacy, tmp_path):
    # each invocation pins its jobs to every core: two at once would put two jobs on each
    lock = tmp_path / "efficacy.lock"
    with efficacy.sole_invocation(tmp_path / "first", lock):
        with pytest.raises(SystemExit, match=re.escape(f"pid {os.getpid()}, --out {tmp_path / 'first'}")):
            with efficacy.sole_invocation(tmp_path / "second", lock):
                pass
    with efficacy.sole_invocation(tmp_path / "second", lock):  # released when the first ends
        assert str(tmp_path / "second") in lock.read_text()
    assert lock.read_text() == ""


def test_the_lock_serves_every_user_of_the_machine(efficacy, tmp_path, monkeypatch):
    # one lock per machine in the shared temporary directory: whoever creates it leaves it writable for
    # the others, and a user who cannot write it (left by an older version, or another umask) still locks
    # it, read-only, instead of failing with a traceback
    lock = tmp_path / "efficacy.lock"
    with efficacy.sole_invocation(tmp_path / "first", lock):
        assert lock.stat().st_mode & 0o777 == 0o666

    real_open = os.open

    def another_user(path, flags, *args):
        if Path(path) == lock and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    with efficacy.sole_invocation(tmp_path / "first", lock):
        monkeypatch.setattr(efficacy.os, "open", another_user)
        with pytest.raises(SystemExit, match=re.escape(f"pid {os.getpid()}, --out {tmp_path / 'first'}")):
            with efficacy.sole_invocation(tmp_path / "second", lock):
                pass
        monkeypatch.undo()
    monkeypatch.setattr(efficacy.os, "open", another_user)
    with efficacy.sole_invocation(tmp_path / "second", lock):  # free: taken read-only, its holder unwritten
        pass
