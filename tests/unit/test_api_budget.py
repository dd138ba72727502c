"""What the operator asks of the API server: the Job watch filtered on the server, hints debounced."""

import threading
import time

import kopf

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
    assert reader.deadline == PASS_DEADLINE <= 10
    assert reader.store_for("file:///tmp/x/") is not reader.store_for("s3://bucket/runs/")
