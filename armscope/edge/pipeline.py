"""Newest-wins hand-over between pipeline stages.

Each stage runs in its own thread and passes work to the next through a
:class:`LatestSlot`, a queue of size one whose ``put`` replaces an unread item
instead of blocking. So a slow stage never makes a fast one wait or pile up a
backlog: throughput is that of the slowest stage, and the item the slow stage
takes next is always the newest. Replaced items are counted as drops.
"""
from __future__ import annotations

import threading
import time


class SlotClosed(Exception):
    """The producer closed the slot and it is empty: the consumer should exit."""


class LatestSlot:
    """A size-1 queue where the newest item wins."""

    def __init__(self, name: str = "slot"):
        self.name = name
        self._item = None
        self._has = False
        self._closed = False
        self._cond = threading.Condition()
        self._waiting = 0   # consumers blocked in get()
        self.dropped = 0
        self.put_count = 0

    def put(self, item) -> bool:
        """Store ``item``; returns True if it replaced an unread one (a drop)."""
        with self._cond:
            replaced = self._has
            if replaced:
                self.dropped += 1
            self._item, self._has = item, True
            self.put_count += 1
            self._cond.notify_all()
            return replaced

    def get(self, timeout: float | None = None):
        """The newest item, waiting up to ``timeout`` seconds. Returns None on
        timeout; raises SlotClosed once closed and empty."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._has:
                if self._closed:
                    raise SlotClosed(self.name)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._waiting += 1
                self._cond.notify_all()
                try:
                    self._cond.wait(remaining)
                finally:
                    self._waiting -= 1
            item, self._item, self._has = self._item, None, False
            return item

    def wait_for_consumer(self, timeout: float) -> bool:
        """Block until a consumer waits in ``get`` on an empty slot (True) or ``timeout``
        passes (False). A producer that calls this first does its work just in time:
        it never prepares items that a newer one would replace unread."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not (self._waiting and not self._has):
                if self._closed:
                    return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def discard(self) -> bool:
        """Drop an unread item (counted); True if there was one."""
        with self._cond:
            if self._has:
                self._item, self._has = None, False
                self.dropped += 1
                return True
            return False

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
