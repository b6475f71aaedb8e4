"""Display-controller simulator: the far end of the link, in Python.

Why this package exists
-----------------------
The host side (``link.LinkSender``) must be tested against something that
behaves like the microcontroller behind the eyepiece display, including its
failure modes, without hardware. ``controller.ControllerCore`` is the
transport-free protocol state machine (with ``FaultPlan`` fault injection);
``pty_transport.PtyController`` serves it on a pseudo-terminal so the host
talks to it through real pyserial, exactly as to a USB-serial adapter. Like
the host's link, the simulator needs the ``[serial]`` extra (its replies are
COBS-encoded by the compiled kernel).
"""

from __future__ import annotations

from .controller import ControllerCore, ControllerStats, FaultPlan
from .pty_transport import PtyController

__all__ = ["FaultPlan", "ControllerStats", "ControllerCore", "PtyController"]
