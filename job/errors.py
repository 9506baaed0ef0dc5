"""Typed failures, each carrying the exit code of the contract (CONTRACT.md §4)."""


class JobError(Exception):
    """A failure the job explains to the user; `exit_code` is what the process exits with."""

    exit_code = 1


class ConfigError(JobError):
    """Settings are invalid, or storage refuses access / the bucket is missing. Not retried."""

    exit_code = 2


class InputError(JobError):
    """The instance data is unusable: no images, none decode, unsafe archive, captions missing."""

    exit_code = 3


class ModelError(JobError):
    """The base model is unusable: not found, not safetensors, wrong architecture."""

    exit_code = 4


class OutOfMemoryError(JobError):
    """The GPU ran out of memory at the requested settings."""

    exit_code = 5


class DivergedError(JobError):
    """Training produced a non-finite loss (NaN or Inf); nothing is published. Not retried."""

    exit_code = 6


class TransientError(JobError):
    """Storage or network failed even after retries; the next attempt may succeed."""

    exit_code = 75


class Preempted(JobError):
    """SIGTERM arrived; a checkpoint was saved and the next pod resumes from it."""

    exit_code = 143


def find_job_error(error: BaseException) -> JobError | None:
    """The first `JobError` down `error`'s chain of causes (itself included), else None.

    Libraries wrap what they catch (diffusers' lazy imports turn our SIGTERM's `Preempted` into a
    RuntimeError; a callback's storage failure comes back inside another exception): the JobError
    inside is still the reason the job stops.
    """
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, JobError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None
