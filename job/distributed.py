"""Work that one process per machine does before the others, when accelerate launches several."""

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def local_main_first(accelerator, work: Callable[[], T], others: Callable[[], T] | None = None) -> T:
    """Runs `work` on the local main process, waits for every process, then runs `others` on the rest.

    `others` defaults to `work` itself, which then finds its work done (a cache filled, a file
    written); give it to read a hand-off file instead, or a no-op when the others need nothing but
    the wait. Each process returns its own call's result. With one process this is just `work()`.
    """
    main = accelerator.is_local_main_process
    result = work() if main else None
    accelerator.wait_for_everyone()
    if not main:
        result = (others or work)()
    return result


def nothing() -> None:
    """The `others` of work that only the local main process does."""
