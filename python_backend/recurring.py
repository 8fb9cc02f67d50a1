"""A daemon thread that does one thing whenever it is due, for the work an orchestrator stub does
between requests: publishing metrics after the last request, sharing state with the model's other
instances, closing the SLO controller's windows and reading Triton's queue between them.

Each is its own thread rather than work done on a request's way through, so no request waits for it (a
read of Triton's metrics page took about half a millisecond of a request's time, more under load) and
it happens when no request comes at all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

# The shortest sleep between two runs: a ``due_in`` that says "now" again right after a run (work that
# declined to run, a clock that moved back) must not spin the thread.
MIN_SLEEP_S = 0.01


class Recurring:
    """Runs ``action`` in a daemon thread named ``name`` whenever ``due_in()`` (seconds until it is due,
    0 or less: now) says so, until ``close``. An error goes to ``on_error`` and the thread goes on."""

    def __init__(
        self,
        name: str,
        due_in: Callable[[], float],
        action: Callable[[], object],
        on_error: Callable[[Exception], None],
    ) -> None:
        self.due_in, self.action, self.on_error = due_in, action, on_error
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(max(self.due_in(), MIN_SLEEP_S)):
            try:
                self.action()
            except Exception as error:  # noqa: BLE001 -- one failed run must not end the thread
                self.on_error(error)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        """Stops the thread and waits for a run in progress to end."""
        self._stopping.set()
        self._thread.join()
