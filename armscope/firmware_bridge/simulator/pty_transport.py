"""``PtyController``: serves a simulated display controller on a pseudo-terminal.

Why this module exists
----------------------
The host must be tested through the same path as with hardware: pyserial on a
tty device, with its timeouts, partial reads and buffering. A pty gives a
real ``/dev/pts/N`` to open with ``serial.Serial``; a background thread moves
bytes between its master side and a transport-free ``ControllerCore``
(``controller.py``), which holds all the protocol. Kept apart from it so the
controller's state machine reads as the firmware reference it is.
"""

from __future__ import annotations

import os
import select
import threading
import time
import tty
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from .controller import ControllerCore

__all__ = ["PtyController"]


class PtyController:
    """Serve a ``ControllerCore`` on a pseudo-terminal from a background thread.

    ``start()`` returns the slave path (e.g. ``/dev/pts/5``) to open with
    ``serial.Serial``.  The master side is non-blocking and replies are
    queued, so a host that stops reading can never deadlock the simulator.
    """

    def __init__(self, core: ControllerCore, *, announce_boot: bool = False):
        self.core = core
        self.announce_boot = announce_boot
        self._master = self._slave = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._out = bytearray()
        self._reset_requests = 0
        self.slave_path: str | None = None
        self.error: BaseException | None = None

    def start(self) -> str:
        master, slave = os.openpty()
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self.slave_path = os.ttyname(slave)
        if self.announce_boot:
            self._out += self.core.boot_message()
        self._thread = threading.Thread(target=self._run, name="pty-controller", daemon=True)
        self._thread.start()
        return self.slave_path

    def request_reset(self) -> None:
        """Reset the controller from outside (as a watchdog would), thread-safely."""
        self._reset_requests += 1

    def _run(self) -> None:
        done_resets = 0
        try:
            while not self._stop.is_set():
                self.core.tick()
                if self._reset_requests > done_resets:
                    done_resets += 1
                    self._out += self.core.reset()
                wlist = [self._master] if self._out else []
                r, w, _ = select.select([self._master], wlist, [], 0.02)
                if r:
                    try:
                        data = os.read(self._master, 1 << 16)
                    except (BlockingIOError, InterruptedError):
                        data = b""
                    except OSError:  # EIO: no process has the slave open right now
                        data = b""
                        time.sleep(0.01)
                    if data:
                        self._out += self.core.receive(data)
                if self._out and (w or not wlist):
                    try:
                        n = os.write(self._master, self._out)
                        del self._out[:n]
                    except (BlockingIOError, InterruptedError):
                        pass
        except BaseException as exc:  # surfaced by stop()
            self.error = exc

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for fd in (self._master, self._slave):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._master = self._slave = None
        if self.error is not None:
            raise RuntimeError(f"simulator thread failed: {self.error!r}") from self.error

    def __enter__(self) -> "PtyController":
        if self.slave_path is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
