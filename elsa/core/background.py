"""Slow read-only work (a report over the store) off the event thread.

One worker thread runs the submitted functions in order; each result goes
back to the event thread through a pipe the loop watches, so the callback that
sends the reply runs there, like every other reply (GUIDE: the event thread
never waits).
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any, Callable, List, Optional, Tuple

from elsa.logsetup import structlog

log = structlog.get_logger("elsa.background")

Done = Callable[[Any, Optional[BaseException]], None]


class Background:
    def __init__(self, add_reader: Callable[[int, Callable[[], None]], None]) -> None:
        self._todo: queue.Queue[Optional[Tuple[Callable[[], Any], Done]]] = queue.Queue()
        self._done: List[Tuple[Done, Any, Optional[BaseException]]] = []
        self._lock = threading.Lock()
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        add_reader(self._r, self._deliver)
        self._thread = threading.Thread(target=self._run, name="elsa-background", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], done: Done) -> None:
        """Run *fn()* on the worker; then *done(result, error)* on the event thread."""
        self._todo.put((fn, done))

    def pending(self) -> int:
        return self._todo.qsize()

    def _run(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            fn, done = item
            try:
                result, error = fn(), None
            except BaseException as exc:  # handed to the event thread as the answer
                result, error = None, exc
            with self._lock:
                self._done.append((done, result, error))
            try:
                os.write(self._w, b"x")
            except BlockingIOError:
                pass  # a wake-up is already pending

    def _deliver(self) -> None:
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            ready, self._done = self._done, []
        for done, result, error in ready:
            try:
                done(result, error)
            except Exception:
                log.exception("background completion failed")

    def close(self, remove_reader: Callable[[int], None]) -> None:
        self._todo.put(None)
        self._thread.join(timeout=10.0)
        remove_reader(self._r)
        os.close(self._r)
        os.close(self._w)
