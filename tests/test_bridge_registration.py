"""Camera -> display homography: point pairs, RANSAC, dot grid, file I/O, warping."""

import json

import cv2
import numpy as np
import pytest

from armscope.firmware_bridge import registration as R

DISPLAY = (640, 480)
CAMERA = (800, 600)
H_TRUE = np.array([[0.78, 0.035, 12.0], [-0.028, 0.80, 9.0], [2.0e-5, -1.5e-5, 1.0]])


def project(h, pts):
    return cv2.perspectiveTransform(np.asarray(pts, float).reshape(-1, 1, 2), h).reshape(-1, 2)


def test_from_point_pairs_recovers_known_homography():
    rng = np.random.default_rng(0)
    cam = rng.uniform([0, 0], CAMERA, (40, 2))
    disp = project(H_TRUE, cam) + rng.normal(0, 0.1, (40, 2))
    reg = R.from_point_pairs(cam, disp, DISPLAY)
    assert reg.rms_error < 0.5
    grid = np.array([[x, y] for x in (0, 400, 800) for y in (0, 300, 600)], float)
    assert np.abs(reg.map_points(grid) - project(H_TRUE, grid)).max() < 0.5
    assert reg.n_points == reg.n_inliers == 40


def test_ransac_rejects_outliers():
    rng = np.random.default_rng(1)
    cam = rng.uniform([0, 0], CAMERA, (50, 2))
    disp = project(H_TRUE, cam)
    cam[:10] += rng.uniform(30, 80, (10, 2))  # 20% gross outliers: dots found in the wrong place
    plain = R.from_point_pairs(cam, disp, DISPLAY)
    robust = R.from_point_pairs(cam, disp, DISPLAY, ransac=True, ransac_threshold=2.0)
    assert plain.rms_error > 5
    assert robust.rms_error < 0.5
    assert robust.n_inliers == 40


def test_too_few_or_degenerate_points():
    with pytest.raises(R.RegistrationError, match="at least 4"):
        R.from_point_pairs([[0, 0], [1, 0], [0, 1]], [[0, 0], [1, 0], [0, 1]], DISPLAY)
    line = [[i, i] for i in range(6)]
    with pytest.raises(R.RegistrationError):
        R.from_point_pairs(line, line, DISPLAY)


def camera_view_of_grid(cols, rows, blur=True):
    pattern = R.render_dot_grid(cols, rows, DISPLAY)
    cam = cv2.warpPerspective(pattern, np.linalg.inv(H_TRUE), CAMERA, flags=cv2.INTER_LINEAR)
    if blur:
        cam = cv2.GaussianBlur(cam, (5, 5), 1.0)
    cam = cv2.add((cam * 0.7).astype(np.uint8), 20)  # dim, with a background level
    return cam


def test_dot_grid_registration_matches_truth():
    cam = camera_view_of_grid(9, 6)
    reg = R.from_camera_image(cam, (9, 6), DISPLAY)
    assert reg.rms_error < 0.5
    assert reg.method == "dot-grid"
    pts = np.array([[100, 100], [700, 120], [400, 500], [60, 560]], float)
    assert np.abs(reg.map_points(pts) - project(H_TRUE, pts)).max() < 1.0


def test_dot_grid_not_found_is_an_error():
    with pytest.raises(R.RegistrationError, match="no 9x6 dot grid"):
        R.from_camera_image(np.zeros((200, 300), np.uint8), (9, 6), DISPLAY)


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    cam = rng.uniform([0, 0], CAMERA, (12, 2))
    reg = R.from_point_pairs(cam, project(H_TRUE, cam), DISPLAY)
    path = tmp_path / "reg.json"
    R.save_registration(reg, path)
    doc = json.loads(path.read_text())
    assert doc["version"] == 1 and doc["display_size"] == [640, 480] and len(doc["matrix"]) == 3
    back = R.load_registration(path)
    assert np.allclose(back.matrix, reg.matrix) and back.display_size == DISPLAY
    assert back.rms_error == pytest.approx(reg.rms_error)


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda d: d.pop("matrix"), "matrix"),
        (lambda d: d.__setitem__("matrix", [[1, 0], [0, 1]]), "matrix"),
        (lambda d: d["matrix"][1].__setitem__(2, "x"), "matrix[1][2]"),
        (lambda d: d.__setitem__("display_size", [640, -1]), "display_size[1]"),
        (lambda d: d.__setitem__("version", 99), "version"),
        (lambda d: d.__setitem__("rms_error", None), "rms_error"),
    ],
)
def test_load_errors_name_file_and_field(tmp_path, mutate, field):
    doc = {"version": 1, "display_size": [640, 480], "matrix": [[1, 0, 0], [0, 1, 0], [0, 0, 1]], "rms_error": 0.1}
    mutate(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(R.RegistrationFileError) as exc:
        R.load_registration(path)
    assert str(path) in str(exc.value) and repr(field) in str(exc.value)
    assert exc.value.field == field


def test_load_invalid_json_and_missing_file(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(R.RegistrationFileError, match="invalid JSON"):
        R.load_registration(p)
    with pytest.raises(R.RegistrationFileError, match="cannot read"):
        R.load_registration(tmp_path / "missing.json")


def test_point_files_json_and_csv(tmp_path):
    cam = [[10, 20], [300, 25], [310, 240], [15, 230], [150, 120]]
    disp = project(H_TRUE, cam).tolist()
    j = tmp_path / "p.json"
    j.write_text(json.dumps({"pairs": [{"camera": c, "display": d} for c, d in zip(cam, disp)]}))
    c2, d2 = R.load_point_pairs(j)
    assert np.allclose(c2, cam) and np.allclose(d2, disp)
    c = tmp_path / "p.csv"
    c.write_text("camera_x,camera_y,display_x,display_y\n" + "".join(f"{a},{b},{x},{y}\n" for (a, b), (x, y) in zip(cam, disp)))
    c3, d3 = R.load_point_pairs(c)
    assert np.allclose(c3, cam) and np.allclose(d3, disp)
    c.write_text("camera_x,camera_y,display_x,display_y\n1,2,3,4\n5,six,7,8\n")
    with pytest.raises(R.RegistrationFileError, match="line 3") as exc:
        R.load_point_pairs(c)
    assert str(c) in str(exc.value)
    j.write_text(json.dumps({"pairs": [{"camera": [1, 2]}]}))
    with pytest.raises(R.RegistrationFileError, match=r"pairs\[0\]"):
        R.load_point_pairs(j)
    j.write_text("camera: oops")  # a broken .json file is reported as JSON, not as a CSV missing its header
    with pytest.raises(R.RegistrationFileError, match="invalid JSON"):
        R.load_point_pairs(j)


def test_warp_integer_shift_is_exact_with_transparent_border():
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (40, 60, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    shift = np.array([[1, 0, 5], [0, 1, 3], [0, 0, 1]], float)
    reg = R.Registration(shift, (60, 40), 0.0)
    out = R.warp(rgba, reg)
    assert out.shape == (40, 60, 4)
    assert np.array_equal(out[3:, 5:], rgba[:-3, :-5])
    assert not out[:3].any() and not out[:, :5].any()  # transparent black border


def test_warp_does_not_bleed_hidden_colour():
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:, :10] = (255, 0, 0, 255)  # opaque red
    rgba[:, 10:] = (0, 255, 0, 0)  # green, fully transparent
    half = np.array([[1, 0, 0.5], [0, 1, 0], [0, 0, 1]], float)
    out = R.warp(rgba, R.Registration(half, (20, 20), 0.0))
    shown = R.warp(rgba, R.Registration(half, (20, 20), 0.0), premultiplied_out=True)
    assert out[..., 1].max() == 0 and shown[..., 1].max() == 0  # no green anywhere
    assert shown[5, 10, 0] in (127, 128)  # the edge pixel is half-covered red
    assert out[5, 10, 0] >= 254  # straight alpha keeps full red at half alpha


@pytest.mark.parametrize("seed", range(4))
def test_render_for_display_warps_only_the_footprint_and_loses_nothing(seed):
    """The region the bridge renders and sends holds every pixel a full-display
    warp would light: pasted into black it equals the full warp (to one grey
    level of fixed-point rounding), and outside it the full warp is black."""
    import cv2

    from armscope.firmware_bridge.bridge import render_for_display

    rng = np.random.default_rng(seed)
    size = (320, 200)
    overlay = rng.integers(0, 256, (96, 96, 4), dtype=np.uint8)
    a = rng.uniform(-0.2, 0.2)
    s = rng.uniform(0.8, 1.6)
    m = np.array([[s * np.cos(a), -s * np.sin(a), rng.uniform(-40, 250)],
                  [s * np.sin(a), s * np.cos(a), rng.uniform(-40, 140)],
                  [rng.uniform(-3e-4, 3e-4), rng.uniform(-3e-4, 3e-4), 1.0]])
    rgb, (x, y, w, h) = render_for_display(overlay, m, size)
    premult = cv2.cvtColor(overlay, cv2.COLOR_RGBA2mRGBA)
    full = cv2.cvtColor(cv2.warpPerspective(premult, m, size, flags=cv2.INTER_LINEAR,
                                            borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0)),
                        cv2.COLOR_RGBA2RGB)
    assert full.any()
    pasted = np.zeros_like(full)
    pasted[y:y + h, x:x + w] = rgb
    assert np.abs(pasted.astype(int) - full).max() <= 1
    outside = full.copy()
    outside[y:y + h, x:x + w] = 0
    assert not outside.any()
    assert w * h < size[0] * size[1]


@pytest.mark.parametrize("seed", range(4))
def test_render_for_grey_displays_warps_luma_into_the_aligned_region(seed):
    """For grey displays the bridge warps the composited luma (one channel)
    straight into the region the display addresses (MONO1: x in whole
    bytes): within one grey level of the luma of the RGB render, and the
    region is exactly the aligned footprint."""
    import cv2

    from armscope.firmware_bridge.bridge import render_for_display

    def align8(r):
        x, y, w, h = r
        x0 = x - x % 8
        return (x0, y, min(320, -(-(x + w) // 8) * 8) - x0, h)

    rng = np.random.default_rng(seed)
    size = (320, 200)
    overlay = rng.integers(0, 256, (96, 96, 4), dtype=np.uint8)
    m = np.array([[1.2, 0.1, rng.uniform(3, 200)], [-0.1, 1.1, rng.uniform(0, 90)], [1e-4, -2e-4, 1.0]])
    rgb, region = render_for_display(overlay, m, size)
    luma, lregion = render_for_display(overlay, m, size, luma=True, align=align8)
    assert lregion == align8(region) and lregion[0] % 8 == 0 and luma.shape == (lregion[3], lregion[2])
    want = np.zeros((size[1], size[0]), np.uint8)
    x, y, w, h = region
    want[y:y + h, x:x + w] = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    x, y, w, h = lregion
    got = np.zeros_like(want)
    got[y:y + h, x:x + w] = luma
    assert want.any() and np.abs(got.astype(int) - want).max() <= 1
