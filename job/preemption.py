"""SIGTERM (Kubernetes eviction, spot reclaim, `docker stop`): one flag for the whole process.

The handler records the request. Outside the training loop it also raises `Preempted` at once,
since nothing there is worth saving; a library may swallow that exception, so stage boundaries check
the flag too. Inside the loop it only records: the loop saves a checkpoint at the next step boundary.
"""

import signal
import threading
from contextlib import contextmanager

from job.errors import Preempted

_requested = threading.Event()
_in_training = threading.Event()
OUTSIDE_TRAINING = "stopped by SIGTERM outside the training loop; nothing to save, the next attempt redoes this stage"


def _handle(signum, frame) -> None:
    _requested.set()
    if not _in_training.is_set():
        raise Preempted(OUTSIDE_TRAINING)


@contextmanager
def handling_sigterm():
    """Installs the handler for the duration of the job."""
    previous = signal.signal(signal.SIGTERM, _handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def training():
    """Within: SIGTERM only sets the flag (the loop checks `requested()` at each step boundary)."""
    _in_training.set()
    try:
        yield
    finally:
        _in_training.clear()


def requested() -> bool:
    return _requested.is_set()


def stop_if_requested() -> None:
    """Raises `Preempted` when a SIGTERM arrived (called at stage boundaries)."""
    if _requested.is_set():
        raise Preempted(OUTSIDE_TRAINING)
