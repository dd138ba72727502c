"""The run lifecycle through the operator's reconcile (without kopf): submit errors, events, backoff.

The API server's answers are the real `kubernetes` client's `ApiException`s
(what TorchX's `KubernetesScheduler.schedule` raises), classified by
`classify_submit_error` exactly as `TorchXJobBackend.submit` does.
"""

import json
import threading
from datetime import datetime, timedelta, timezone

import pytest
from kubernetes.client.rest import ApiException
from test_controller import TEACHER_0, InMemoryRunsApi, layout_of, name, setup  # noqa: F401 (fixture)

from noisy_student_operator.backend import InMemoryJobBackend, classify_submit_error
from noisy_student_operator.controller import RunController
from noisy_student_operator.core.planner import JobState
from noisy_student_operator.handlers import Requeuer
from noisy_student_operator.reconcile import MarkerReader, Reconciler

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
WEBHOOK_DENIAL = ('admission webhook "validatejob.volcano.sh" denied the request: '
                  "unable to find job queue: queue.scheduling.volcano.sh \"gpu\" not found")


def api_error(status, reason, message=None):
    error = ApiException(status=status, reason=reason)
    if message is not None:
        error.body = json.dumps({"kind": "Status", "status": "Failure", "message": message, "code": status})
    return error


class FlakyBackend(InMemoryJobBackend):
    """Submissions raise the queued errors (classified as TorchXJobBackend does) before they work."""

    def __init__(self, *errors):
        super().__init__()
        self.errors = list(errors)

    def submit(self, request, context):
        if self.errors:
            self.submissions.append(request.name)
            raise classify_submit_error(self.errors.pop(0))
        return super().submit(request, context)


class Clock:
    def __init__(self):
        self.now = T0

    def __call__(self):
        return self.now


def make_controller(api, backend, clock, events, requeues):
    return RunController(
        api,
        {"kubernetes": backend},
        reconciler_for=lambda b: Reconciler(b, MarkerReader(), clock=clock),
        post_event=lambda body, t, r, m: events.append((t, r, m)),
        requeue=lambda ns, n, seconds: requeues.append(seconds),
    )


def conditions(api):
    return {c["type"]: c for c in api.objects[("ml", "demo")]["status"]["conditions"]}


# ----------------------------------------------------------------------------- classification

# kube-apiserver's OwnerReferencesPermissionEnforcement admission (plugin/pkg/admission/gc), verbatim.
RESTMAPPING_LAG = (
    'jobs.batch.volcano.sh "prepare-04ac7e201c0b4483" is forbidden: cannot set blockOwnerDeletion in this case '
    "because cannot find RESTMapping for APIVersion noisystudent.dev/v1alpha1 Kind NoisyStudentRun: "
    'no matches for kind "NoisyStudentRun" in version "noisystudent.dev/v1alpha1"'
)
FINALIZERS_FORBIDDEN = (
    'jobs.batch.volcano.sh "prepare-04ac7e201c0b4483" is forbidden: cannot set blockOwnerDeletion if an '
    "ownerReference refers to a resource you can't set finalizers on: , <nil>"
)


@pytest.mark.parametrize(
    ("error", "permanent", "quoted"),
    [
        (api_error(400, "Bad Request", WEBHOOK_DENIAL), True, "unable to find job queue"),
        (api_error(403, "Forbidden", 'jobs.batch.volcano.sh is forbidden: exceeded quota: q'), True, "exceeded quota"),
        (api_error(422, "Unprocessable Entity", "Job.batch.volcano.sh \"x\" is invalid"), True, "is invalid"),
        (api_error(404, "Not Found", 'namespaces "gone" not found'), True, "not found"),
        # The API server's admission maps an owner's kind through discovery refreshed every 30 s:
        # a run applied right after `helm install` put its CRD in place is refused for a while.
        (api_error(403, "Forbidden", RESTMAPPING_LAG), False, "cannot find RESTMapping"),
        (api_error(403, "Forbidden", FINALIZERS_FORBIDDEN), True, "cannot set blockOwnerDeletion"),
        (api_error(500, "Internal Server Error", "etcdserver: request timed out"), False, "request timed out"),
        # etcd refuses an object over its --max-request-bytes (1.5 MiB by default): the same Job fails again.
        (api_error(500, "Internal Server Error", "etcdserver: request is too large"), True, "request is too large"),
        (api_error(500, "Internal Server Error", "rpc error: code = ResourceExhausted desc = trying to send message "
                   "larger than max (2145974 vs. 2097152)"), True, "larger than max"),
        (api_error(503, "Service Unavailable"), False, "Service Unavailable"),
        (api_error(429, "Too Many Requests", "throttled"), False, "throttled"),
        (api_error(409, "Conflict", "the object has been modified"), False, "modified"),
        (ConnectionResetError("connection reset by peer"), False, "connection reset"),
        (ValueError("role 'teacher': replicas must be >= 1"), True, "replicas must be"),
    ],
)
def test_submit_errors_are_classified_and_quote_the_server(error, permanent, quoted):
    classified = classify_submit_error(error)
    assert classified.permanent is permanent
    assert quoted in str(classified)
    assert classified.reason == ("SubmitRejected" if permanent else "SubmitFailed")


# ----------------------------------------------------------------------------- submit errors


def test_refused_submission_fails_the_run_with_the_servers_message(setup):
    api, _, _, _, _, layout = setup
    backend = FlakyBackend(api_error(400, "Bad Request", WEBHOOK_DENIAL))
    events, requeues = [], []
    controller = make_controller(api, backend, Clock(), events, requeues)
    assert controller.reconcile("ml", "demo") is not None  # the pass does not raise
    status = api.objects[("ml", "demo")]["status"]
    failed = conditions(api)["Failed"]
    assert failed["status"] == "True" and failed["reason"] == "SubmitRejected"
    assert "unable to find job queue" in failed["message"]
    assert conditions(api)["Ready"]["status"] == "False"
    assert conditions(api)["Ready"]["reason"] == "SubmitRejected"  # the Reason column of `kubectl get nsr`
    job = status["jobs"][0]
    assert job["state"] == "Failed" and job["reason"] == "SubmitRejected"
    assert [r for _, r, _ in events] == ["SubmitError", "RunFailed"]
    # Never retried, no further Events: the run stays Failed until its spec changes.
    for _ in range(3):
        controller.reconcile("ml", "demo")
    assert backend.submissions == [name(layout, TEACHER_0)]
    assert len(events) == 2


def test_transient_submit_error_is_retried_with_backoff_to_the_second(setup):
    api, _, _, _, _, layout = setup
    api.objects[("ml", "demo")]["spec"]["retry"] = {"limit": 2, "backoffSeconds": 7, "maxBackoffSeconds": 60}
    backend = FlakyBackend(api_error(503, "Service Unavailable"), api_error(500, "Internal Server Error", "etcd"))
    clock, events, requeues = Clock(), [], []
    controller = make_controller(api, backend, clock, events, requeues)
    controller.reconcile("ml", "demo")
    job = api.objects[("ml", "demo")]["status"]["jobs"][0]
    assert job["state"] == "Pending" and job["submitFailures"] == 1 and "503" in job["message"]
    assert conditions(api)["Progressing"]["reason"] == "WaitingForRetry"
    assert conditions(api)["Ready"]["reason"] == "WaitingForRetry"
    assert requeues == [7.0]
    clock.now += timedelta(seconds=6)
    controller.reconcile("ml", "demo")  # the backoff has not run out: nothing is submitted
    assert len(backend.submissions) == 1 and requeues[-1] == 1.0
    clock.now += timedelta(seconds=1)
    controller.reconcile("ml", "demo")  # second failure: the backoff doubles
    assert len(backend.submissions) == 2 and requeues[-1] == 14.0
    clock.now += timedelta(seconds=14)
    controller.reconcile("ml", "demo")
    assert backend.submissions == [name(layout, TEACHER_0)] * 3 and backend.jobs[name(layout, TEACHER_0)]
    controller.reconcile("ml", "demo")  # observed running: the submit error is history
    job = api.objects[("ml", "demo")]["status"]["jobs"][0]
    assert job["state"] == "Running" and job.get("message") is None and job["attempt"] == 0
    assert not conditions(api)["Failed"]["status"] == "True"
    assert [r for _, r, _ in events] == ["SubmitError", "SubmitError", "JobResubmitted"]


def test_job_failure_posts_one_event_while_its_retry_waits(setup):
    api, _, _, _, _, layout = setup
    backend = InMemoryJobBackend()
    clock, events, requeues = Clock(), [], []
    controller = make_controller(api, backend, clock, events, requeues)
    controller.reconcile("ml", "demo")
    backend.jobs[name(layout, TEACHER_0)] = JobState.FAILED
    for _ in range(5):
        clock.now += timedelta(seconds=1)
        controller.reconcile("ml", "demo")
    assert [r for _, r, _ in events].count("JobFailed") == 1
    assert requeues == [10.0, 9.0, 8.0, 7.0, 6.0]  # failed at T0+1 s, retried at T0+11 s (default 10 s)


# ----------------------------------------------------------------------------- failed passes


def test_unreadable_artifact_store_is_a_condition_with_the_stores_message(setup):
    api, _, _, _, _, _ = setup

    def forbidden(root):
        raise PermissionError("An error occurred (403) when calling the HeadObject operation: Forbidden")

    events = []
    controller = RunController(
        api, {"kubernetes": InMemoryJobBackend()},
        reconciler_for=lambda b: Reconciler(b, MarkerReader(store_for=forbidden)),
        post_event=lambda body, t, r, m: events.append((t, r, m)),
    )
    for _ in range(3):
        assert controller.reconcile("ml", "demo") is None  # no exception for kopf to turn into Events
    ready = conditions(api)["Ready"]
    assert ready["status"] == "False" and ready["reason"] == "ArtifactStoreError"
    assert "(403) when calling the HeadObject operation: Forbidden" in ready["message"]
    assert [r for _, r, _ in events] == ["ArtifactStoreError"]


def test_requeuer_fires_once_and_a_new_schedule_replaces_the_old():
    fired = []
    done = threading.Event()

    def callback(namespace, name):
        fired.append((namespace, name))
        done.set()

    requeuer = Requeuer(callback)
    requeuer.schedule("ml", "demo", 30.0)
    requeuer.schedule("ml", "demo", 0.01)  # replaces the 30 s one
    assert done.wait(10)
    assert fired == [("ml", "demo")]
    assert requeuer.pending() == 0


# ----------------------------------------------------------------------------- cancel confirmed


class SlowCancelBackend(InMemoryJobBackend):
    """Cancelling takes effect only when the test says so (Volcano's `Aborting`); a cancel may raise."""

    def __init__(self):
        super().__init__()
        self.cancel_errors = []

    def cancel(self, job, context):
        self.cancelled.append(job.name)
        if self.cancel_errors:
            raise self.cancel_errors.pop(0)


def set_suspend(api, value):
    body = api.objects[("ml", "demo")]
    body["spec"]["suspend"] = value
    body["metadata"]["generation"] += 1


def test_quick_suspend_resume_never_runs_two_attempts_at_once(setup):
    api, _, _, _, _, layout = setup
    backend = SlowCancelBackend()
    backend.cancel_errors = [api_error(409, "Conflict", "the object has been modified")]
    events, requeues = [], []
    controller = make_controller(api, backend, Clock(), events, requeues)
    controller.reconcile("ml", "demo")
    first = name(layout, TEACHER_0)
    set_suspend(api, True)
    controller.reconcile("ml", "demo")  # asks to cancel; the API answers 409
    job = api.objects[("ml", "demo")]["status"]["jobs"][0]
    assert job["state"] == "Cancelling" and "409" in job["message"]
    set_suspend(api, False)  # a GitOps toggle: resumed before the job stopped
    for _ in range(3):
        controller.reconcile("ml", "demo")  # still running (Aborting): the cancel is asked again
    assert backend.submissions == [first]
    assert backend.cancelled == [first] * 4
    assert api.objects[("ml", "demo")]["status"]["jobs"][0]["state"] == "Cancelling"
    del backend.jobs[first]  # gone
    controller.reconcile("ml", "demo")
    jobs = api.objects[("ml", "demo")]["status"]["jobs"]
    assert [(j["attempt"], j["state"]) for j in jobs] == [(0, "Cancelled"), (1, "Pending")]
    assert backend.submissions == [first, name(layout, TEACHER_0, 1)]
    assert not controller.settled(api.get("ml", "demo"))


# ----------------------------------------------------------------------------- concurrent writers


class RacingRunsApi(InMemoryRunsApi):
    """Another writer changes the run between each read and the operator's status write."""

    def __init__(self, races):
        super().__init__()
        self.races = races

    def get(self, namespace, name, cached=False):
        body = super().get(namespace, name, cached)
        if body is not None and self.races:
            self.races -= 1
            stored = self.objects[(namespace, name)]
            stored["status"] = {**(stored.get("status") or {}), "otherWriter": self.races}
            stored["metadata"]["resourceVersion"] = str(int(stored["metadata"]["resourceVersion"]) + 1)
        return body


def test_status_write_that_meets_a_newer_run_is_done_again_from_a_fresh_read(setup):
    api, _, _, _, _, layout = setup
    racing = RacingRunsApi(races=2)
    racing.objects = api.objects
    backend, events = InMemoryJobBackend(), []
    controller = make_controller(racing, backend, Clock(), events, [])
    controller.reconcile("ml", "demo")
    status = racing.objects[("ml", "demo")]["status"]
    assert status["otherWriter"] == 0  # what the other writer wrote is kept (a merge patch on its version)
    assert status["jobs"][0]["name"] == name(layout, TEACHER_0)
    # The first write meets a 409, and a read shows the status changed (the second race changes it
    # again right after): the pass is done again, from a read after both; create-if-absent, one job.
    assert backend.submissions == [name(layout, TEACHER_0)] * 2
    assert len(backend.jobs) == 1
    assert [r for _, r, _ in events] == ["JobSubmitted"]  # Events of the pass that was written, once


@pytest.mark.parametrize("method", ["schedule", "hint"])
def test_requeued_or_hinted_pass_runs_in_the_context_that_asked_for_it(method):
    """kopf.event needs kopf's context variables (its event queue) in whatever thread posts: a pass
    on a bare timer thread could not post its Events (a hinted pass's RunSucceeded was lost)."""
    import contextvars

    marker = contextvars.ContextVar("marker")
    seen = []
    done = threading.Event()

    def callback(namespace, name):
        seen.append(marker.get(None))
        done.set()

    requeuer = Requeuer(callback)
    marker.set("kopf's context")
    getattr(requeuer, method)("ml", "demo", 0.01)
    assert done.wait(10)
    assert seen == ["kopf's context"]


# ----------------------------------------------------------------------------- removal of finished jobs


def set_ttl(api, seconds):
    api.objects[("ml", "demo")]["spec"]["scheduler"] = {"ttlSecondsAfterFinished": seconds}


def test_finished_job_is_removed_ttl_after_its_end_and_never_resubmitted(setup):
    api, _, _, _, _, layout = setup
    set_ttl(api, 30)
    backend = InMemoryJobBackend()
    clock, events, requeues = Clock(), [], []
    controller = make_controller(api, backend, clock, events, requeues)
    controller.reconcile("ml", "demo")
    first, second = name(layout, TEACHER_0), name(layout, TEACHER_0, 1)
    backend.jobs[first] = JobState.FAILED
    clock.now += timedelta(seconds=1)
    controller.reconcile("ml", "demo")  # records the failure (ended at T0+1 s)
    assert requeues[-1] == 10.0  # the retry's backoff comes before the removal (T0+31 s)
    clock.now += timedelta(seconds=10)
    controller.reconcile("ml", "demo")  # the retry
    assert backend.submissions == [first, second] and backend.removed == []
    assert requeues[-1] == 20.0  # the pass that removes attempt 0
    clock.now += timedelta(seconds=20)
    controller.reconcile("ml", "demo")
    assert backend.removed == [first]
    jobs = api.objects[("ml", "demo")]["status"]["jobs"]
    assert jobs[0]["state"] == "Failed" and jobs[0]["removedAt"] and not jobs[1].get("removedAt")
    for _ in range(3):
        clock.now += timedelta(seconds=5)
        controller.reconcile("ml", "demo")  # gone, and never looked at again
    assert backend.submissions == [first, second] and backend.removed == [first]


def test_a_job_that_ends_in_a_pass_is_removed_by_the_next_one_never_the_same(setup):
    """A job is deleted only once the status read for the pass records its end: if the pass's
    status write were lost, the next pass still finds the job and records it."""
    api, _, _, _, _, layout = setup
    set_ttl(api, 0)
    backend = InMemoryJobBackend()
    clock, events, requeues = Clock(), [], []
    controller = make_controller(api, backend, clock, events, requeues)
    controller.reconcile("ml", "demo")
    first = name(layout, TEACHER_0)
    backend.jobs[first] = JobState.FAILED
    snapshot = json.loads(json.dumps(api.objects[("ml", "demo")]))
    controller.reconcile("ml", "demo")
    assert backend.removed == [] and requeues[-1] == 0.0
    api.objects[("ml", "demo")] = snapshot  # that pass's status write was lost
    controller.reconcile("ml", "demo")
    assert backend.removed == []  # observed and recorded again, not removed
    controller.reconcile("ml", "demo")
    assert backend.removed == [first]
    assert api.objects[("ml", "demo")]["status"]["jobs"][0]["state"] == "Failed"


def test_a_finished_run_is_settled_once_its_jobs_are_removed_and_idle_until_then():
    from noisy_student_operator.controller import RunController

    controller = RunController(None, {})
    body = {
        "metadata": {"generation": 2},
        "spec": {"scheduler": {"ttlSecondsAfterFinished": 60}},
        "status": {"observedGeneration": 2,
                   "conditions": [{"type": "Succeeded", "status": "True"}],
                   "jobs": [{"name": "a", "state": "Succeeded", "finishedAt": T0.isoformat()},
                            {"name": "b", "state": "Cancelled", "finishedAt": T0.isoformat(),
                             "removedAt": T0.isoformat()}]},
    }
    assert not controller.settled(body)  # resumed after a restart: its removal is still to do
    assert controller.idle(body, T0 + timedelta(seconds=59))  # timer ticks cost nothing until it is due
    assert not controller.idle(body, T0 + timedelta(seconds=60))
    body["status"]["jobs"][0]["removedAt"] = (T0 + timedelta(seconds=60)).isoformat()
    assert controller.settled(body) and controller.idle(body, T0)
