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

# Event reasons
JOB_SUBMITTED = "JobSubmitted"
JOB_CANCELLED = "JobCancelled"
JOB_FAILED = "JobFailed"
JOB_RESUBMITTED = "JobResubmitted"
STAGE_COMPLETED = "StageCompleted"
PROMOTED = "Promoted"
STAGE_REUSED = "StageReused"
SPEC_CHANGED = "SpecChanged"
