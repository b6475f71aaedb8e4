"""Camera -> eyepiece-display registration (a 3x3 homography).

Why this module exists
----------------------
Grad-CAM overlays are computed in *camera* pixels, but the microdisplay that
injects them into the eyepiece has its own pixel grid, offset, scaled and
slightly tilted relative to the camera's view of the specimen.  The optics
map one plane onto the other, so a single homography is the right model.  It
is measured once per instrument, either from hand-picked point pairs or by
showing a known dot grid on the display and detecting it in a camera frame
(``cv2.findCirclesGrid``), and stored in a small JSON file that the daemon
loads at start-up.  The RMS reprojection error (in display pixels) is kept in
the file so an operator can tell a good calibration from a bad one.

``warp`` applies the registration to an overlay.  RGBA is warped in
premultiplied form so that colours hidden under alpha=0 never bleed into
visible pixels, and the border is transparent black (the display's "off").

The package, by seam: ``homography`` (the ``Registration`` and fitting it to point
pairs), ``point_pairs`` (the hand-picked pairs' JSON/CSV files), ``dot_grid`` (the
pattern the display shows and finding it in a camera frame), ``registration_file``
(the saved JSON, checked against its schema both ways) and ``warping`` (applying it,
and telling when this install's OpenCV warps slowly). Every public name is
importable from ``armscope.firmware_bridge.registration`` as before.
"""

from __future__ import annotations

from .dot_grid import detect_dot_grid, from_camera_image, grid_points, render_dot_grid
from .homography import (
    REGISTRATION_VERSION,
    Registration,
    RegistrationError,
    RegistrationFileError,
    check_fits_display,
    from_point_pairs,
    mirrors,
    reprojection_errors,
)
from .point_pairs import load_point_pairs
from .registration_file import load_registration, save_registration
from .warping import FAST_WARP_OPENCV, opencv_build, slow_warp_warning, warp

__all__ = [
    "REGISTRATION_VERSION",
    "Registration",
    "RegistrationError",
    "RegistrationFileError",
    "check_fits_display",
    "from_point_pairs",
    "mirrors",
    "load_point_pairs",
    "grid_points",
    "render_dot_grid",
    "detect_dot_grid",
    "from_camera_image",
    "save_registration",
    "load_registration",
    "reprojection_errors",
    "warp",
    "FAST_WARP_OPENCV",
    "opencv_build",
    "slow_warp_warning",
]
