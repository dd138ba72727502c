"""Condition types and CamelCase reasons used in status and Events."""

READY = "Ready"
PROGRESSING = "Progressing"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"
CONDITION_TYPES = (READY, PROGRESSING, SUCCEEDED, FAILED, SUSPENDED)

# Reasons
STAGE_RUNNING = "StageRunning"
WAITING_FOR_RETRY = "WaitingForRetry"
RUN_SUCCEEDED = "RunSucceeded"
RUN_FAILED = "RunFailed"
RUN_SUSPENDED = "RunSuspended"
NOT_SUSPENDED = "NotSuspended"
IN_PROGRESS = "InProgress"
COMPLETED = "Completed"
NO_FAILURE = "NoFailure"
STAGE_FAILED = "StageFailed"
#: The API server (or an admission webhook) refused the job: trying again cannot help.
SUBMIT_REJECTED = "SubmitRejected"
#: Submitting failed with an error that may pass (timeout, 5xx, throttling): retried with backoff.
SUBMIT_FAILED = "SubmitFailed"
#: The artifact store could not be read (credentials, permissions, network): nothing can be decided.
ARTIFACT_STORE_ERROR = "ArtifactStoreError"
#: A pass failed for another reason (the API server, a bug); the message quotes the error.
RECONCILE_ERROR = "ReconcileError"
INVALID_SPEC = "InvalidSpec"
SCHEDULER_NOT_SERVED = "SchedulerNotServed"

#: The current job waits to start (queued, unschedulable, pulling an image); the message says why.
JOB_PENDING = "JobPending"
#: A job waited longer than `pendingTimeoutSeconds` to start.
PENDING_TIMEOUT = "PendingTimeout"
#: A job ran longer than `activeDeadlineSeconds`.
DEADLINE_EXCEEDED = "DeadlineExceeded"

#: A job's pods were evicted, preempted or lost with their node, or the job was aborted
#: outside the operator: retried with its own budget (`retry.disruptionLimit`).
DISRUPTED = "Disrupted"
#: More disruptions of one stage than `retry.disruptionLimit`.
TOO_MANY_DISRUPTIONS = "TooManyDisruptions"
#: The workload exited with code 2: its configuration is wrong, and a retry would fail the same way.
INVALID_CONFIG = "InvalidConfig"
#: Failures that no retry can help: the run fails at once.
PERMANENT_FAILURES = (SUBMIT_REJECTED, INVALID_CONFIG)

# Event reasons
JOB_SUBMITTED = "JobSubmitted"
JOB_CANCELLED = "JobCancelled"
JOB_FAILED = "JobFailed"
JOB_DISRUPTED = "JobDisrupted"
SUBMIT_ERROR = "SubmitError"
JOB_RESUBMITTED = "JobResubmitted"
STAGE_COMPLETED = "StageCompleted"
PROMOTED = "Promoted"
STAGE_REUSED = "StageReused"
SPEC_CHANGED = "SpecChanged"
STOPPED_EARLY = "StoppedEarly"
