"""A worker that cannot be starved by the GUI thread: one persistent thread plus a GIL-releasing wait.

Why: in Slicer, PythonQt keeps the GIL while Qt idles on the main thread. A worker thread polled by a
QTimer then runs only during the timer slots (a few ms per 100 ms), so a 50 ms decoder call can take a
second. The cure, as SlicerNNInteractive does it: while a job runs, the main thread stays in
:meth:`Worker.wait`, which blocks on the job's future with a timeout (``threading`` waits release the
GIL, so the worker runs at full speed) and calls ``pump`` (``slicer.app.processEvents``) between
waits, so the GUI never waits longer than one ``slot`` (0.06 s by default) for its events.
``Testing/Python/test_worker.py`` emulates the PythonQt main loop (a C call through ``ctypes.PyDLL``
that keeps the GIL) and checks the prompt-to-mask latency against the same call without a GUI loop.

Jobs run one at a time, in the order submitted, on one long-lived thread (the model, its embedding
cache and the prompt session stay warm). Plain Python: no Qt, no Slicer.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Callable, Optional

from .errors import Cancelled

logger = logging.getLogger(__name__)

#: Longest time the main thread spends waiting without pumping GUI events (seconds).
DEFAULT_SLOT = 0.06


class Worker:
    """One persistent worker thread; :meth:`submit` work, :meth:`wait` for it without starving it."""

    def __init__(self, name: str = "medfm"):
        self._name = name
        self._executor: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()

    def submit(self, fn: Callable, *args, **kwargs) -> Future:
        """Run ``fn(*args, **kwargs)`` on the worker thread (after the jobs already submitted)."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self._name)
            return self._executor.submit(fn, *args, **kwargs)

    @staticmethod
    def wait(future: Future, pump: Optional[Callable[[], None]] = None, slot: float = DEFAULT_SLOT,
             timeout: Optional[float] = None) -> bool:
        """Block until ``future`` is done, releasing the GIL, calling ``pump()`` at least every ``slot`` seconds.

        ``pump`` is the GUI's event processing (``slicer.app.processEvents``): the GUI stays responsive and
        may cancel the job meanwhile. Returns True when done, False on ``timeout`` (the job keeps running).
        Re-entrant calls (a pumped event that waits for another job) are fine: they wait in turn.
        """
        if slot <= 0:
            raise ValueError(f"slot must be positive, got {slot}")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = slot if deadline is None else max(0.0, min(slot, deadline - time.monotonic()))
            done, _ = wait_futures([future], timeout=step)  # a threading.Condition wait: the GIL is released
            if done:
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if pump is not None:
                pump()

    def run(self, fn: Callable, *args, pump: Optional[Callable[[], None]] = None, slot: float = DEFAULT_SLOT,
            **kwargs):
        """``submit`` + ``wait`` + the result (or the job's exception)."""
        future = self.submit(fn, *args, **kwargs)
        self.wait(future, pump=pump, slot=slot)
        return future.result()

    def shutdown(self, cancel: bool = True) -> None:
        """Stop accepting work; queued jobs are cancelled (``cancel``), the running one finishes in the background."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=cancel)


class Job:
    """Engine work for the worker thread plus the update that applies its result on the main (GUI) thread.

    ``fraction`` and ``message`` are set by the worker; ``cancel()`` asks long work to stop (the engine raises
    ``Cancelled`` and nothing is applied). Once ``done()``, call ``finish()`` on the main thread: it applies
    the result and returns it, or raises the engine's error. ``nodes``: the MRML nodes the result goes into;
    if one of them left the scene meanwhile (scene closed, node deleted), ``finish()`` raises ``Cancelled``.
    """

    def __init__(self, description, work, apply, progress=None, nodes=()):
        self.description = description
        self.fraction, self.message = 0.0, ""
        self._work, self._apply, self._progress = work, apply, progress
        self._nodes = [n for n in nodes if n is not None]
        self._stop = threading.Event()
        self._future = None

    def progress(self, fraction, message):
        self.fraction, self.message = float(fraction), str(message)
        if self._progress is not None:
            self._progress(fraction, message)

    def shouldStop(self):
        return self._stop.is_set()

    def cancel(self):
        self._stop.set()
        if self._future is not None:
            self._future.cancel()

    def done(self):
        return self._future is not None and self._future.done()

    def finish(self):
        try:
            result = self._future.result()
        except CancelledError:
            raise Cancelled(f"{self.description} was cancelled before it started") from None
        if self._stop.is_set():
            raise Cancelled(f"{self.description} was cancelled")
        gone = [n.GetName() for n in self._nodes if n.GetScene() is None]
        if gone:
            raise Cancelled(f"{self.description}: {', '.join(gone)} left the scene, nothing was written")
        return self._apply(result)
