"""Eyepiece bridge: gets Grad-CAM overlays from the daemon onto the AR microdisplay.

Modules (import them directly; nothing heavy is imported here):

* ``pixel_formats`` - RGBA overlay -> RGB888 / RGB565 LE+BE / GRAY8 / MONO1 bytes.
* ``registration``  - camera -> display homography, its JSON file, ``warp``.
* ``link``          - COBS + CRC-32 framed, acknowledged serial protocol (host side): ``wire``
  (byte layout), ``chunks`` (compiled frame encoder: numba, isal, the ``[serial]`` extra), ``sender``.
* ``simulator``     - the display-controller side, on a pty, with fault injection.
* ``displays``      - ``png://``, ``serial://``, ``fb://``, ``window://`` outputs behind one interface,
  one module per scheme; each scheme's extra is imported only when it is opened.
* ``bridge``        - the runtime: daemon overlays (ZeroMQ) -> registered, converted -> display,
  blanking on every unsafe condition (``docs/bridge.md``).
* ``cli``           - ``run_main`` / ``simulate_main`` / ``register_main`` for ``armscope bridge``.

The wire protocol is specified in ``docs/link-protocol.md``.
"""
