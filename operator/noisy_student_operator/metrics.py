"""Prometheus metrics of the operator (served by `noisy-student operator --metrics-port`)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RUNS = Gauge(
    "noisy_student_runs",
    "Runs seen by this operator, by condition that is True (Progressing, Succeeded, Failed, Suspended).",
    ["condition"],
)
STAGE_SECONDS = Histogram(
    "noisy_student_stage_duration_seconds",
    "Wall time from a stage's first submission to its completion.",
    ["stage"],
    buckets=(10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400),
)
JOB_SUBMISSIONS = Counter("noisy_student_job_submissions_total", "Jobs submitted.", ["stage"])
JOB_FAILURES = Counter("noisy_student_job_failures_total", "Jobs observed failed.", ["stage"])
JOB_RETRIES = Counter("noisy_student_job_retries_total", "Jobs submitted as a retry (attempt > 0).", ["stage"])
RECONCILE_SECONDS = Histogram(
    "noisy_student_reconcile_duration_seconds",
    "Duration of one reconcile pass (observe, plan, act).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
HANDOFF_SECONDS = Histogram(
    "noisy_student_handoff_seconds",
    "From a stage's job seen ending on the watch to the end of the pass that submitted the next "
    "stage's job (status written): how long the operator keeps a run waiting between stages.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60),
)
RECONCILE_ERRORS = Counter("noisy_student_reconcile_errors_total", "Reconcile passes that raised.")


def serve(port: int) -> None:
    """Expose /metrics on `port` (0 disables)."""
    if port:
        start_http_server(port)
