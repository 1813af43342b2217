"""The waiting queue's bound, and how long a refused client should wait before it retries."""

from __future__ import annotations

from app.config import Profile


def queue_is_full(waiting: int, running: int, profile: Profile) -> bool:
    """Requests that will take a free row at the next step are not queueing (they may be held back
    for the arrival window): the bound is on those beyond the batch."""
    free_rows = max(0, profile.max_batch_size - running)
    return waiting >= profile.max_queue + free_rows


class DrainRate:
    """Seconds a waiting request waits per request ahead of it, smoothed over decode steps: the
    busier the batch and the longer its steps, the longer a refused client is told to wait."""

    def __init__(self) -> None:
        self.per_request = 0.0

    def observe_decode(self, seconds: float, batch: int, running: int) -> None:
        if running == 0:
            return
        sample = seconds * max(1, running) / max(1, batch)
        self.per_request = sample if self.per_request == 0 else 0.9 * self.per_request + 0.1 * sample

    def retry_after(self, waiting: int) -> float:
        """For a request refused with ``waiting`` ahead of it: at least a second."""
        return max(1.0, self.per_request * (waiting + 1))


def arrival_wait(waiting: int, running: int, profile: Profile) -> float:
    """Seconds to let arrivals gather before the first prefill of an idle batch: clients answered
    in the same step come back together, and one prefill of all of them beats a lone one."""
    return profile.arrival_window_ms / 1000.0 if waiting and not running else 0.0
