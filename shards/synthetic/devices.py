"""Bright man-made things on top of the anatomy: support devices (endotracheal tube, NG tube, central
line, pacemaker with its lead) as tubes along Bezier paths in body coordinates, and radiopaque foreign
objects (rectangle / ellipse / polygon) in image pixels with integer corners, so an Object-CXR
annotation describes the mask exactly."""

from __future__ import annotations

import math

import numpy as np

from shards.synthetic.catalog import FindingSpec
from shards.synthetic.findings import Effect
from shards.synthetic.geometry import Geom, bezier, inside_polygon, polyline_d, ramp

# A device path: Bezier control points (u, v), tube half-width, brightness, and the pacemaker
# generator box (u, v, half-width, half-height) or None.
DevicePath = tuple[list[tuple[float, float]], float, float, tuple[float, float, float, float] | None]
TUBE_HALF_WIDTH, TUBE_AMP = 0.0055, 0.5
ETT_HALF_WIDTH, ETT_AMP = 0.011, 0.38


def _lateral_device_path(rng, shape: str) -> DevicePath:
    if shape == "ett":
        tip = rng.uniform(0.16, 0.3)
        return [(-0.02, -1.4), (0.0, -0.4), (0.02 + 0.1 * tip, tip)], ETT_HALF_WIDTH, ETT_AMP, None
    if shape == "ng_tube":
        return [(0.05, -1.4), (0.1, 0.3), (0.02, 0.95), (-0.2, 1.12)], TUBE_HALF_WIDTH, TUBE_AMP, None
    if shape == "central_line":
        ctrl = [(0.0, -0.5), (-0.05, 0.1), (-0.12, rng.uniform(0.35, 0.45))]
        return ctrl, TUBE_HALF_WIDTH, TUBE_AMP, None
    return [(-0.5, 0.05), (-0.3, 0.3), (-0.15, 0.8)], TUBE_HALF_WIDTH, TUBE_AMP, (-0.5, 0.05, 0.06, 0.04)


def _frontal_device_path(rng, shape: str, sg: int) -> DevicePath:
    """sg: the patient side a central line or pacemaker enters from (-1 right, +1 left)."""
    if shape == "ett":
        tip = rng.uniform(0.16, 0.3)
        x = rng.uniform(-0.01, 0.02)
        return [(x, -1.4), (x, -0.5), (x + 0.005, tip)], ETT_HALF_WIDTH, ETT_AMP, None
    if shape == "ng_tube":
        x = rng.uniform(-0.01, 0.03)
        ctrl = [(x, -1.4), (x - 0.01, 0.4), (x + 0.02, 0.95), (0.22, 1.1), (0.33, 1.08)]
        return ctrl, TUBE_HALF_WIDTH, TUBE_AMP, None
    if shape == "central_line":
        tip = (-0.06 + rng.uniform(-0.02, 0.02), rng.uniform(0.3, 0.45))
        if rng.random() < 0.5:  # internal jugular
            ctrl = [(sg * 0.13, -0.5), (sg * 0.08, -0.1), (-0.04, 0.1), tip]
        else:  # subclavian / PICC from the arm
            ctrl = [(sg * 0.75, 0.02), (sg * 0.35, -0.06), (-0.05, 0.05), tip]
        return ctrl, TUBE_HALF_WIDTH, TUBE_AMP, None
    gx, gy = sg * rng.uniform(0.38, 0.48), rng.uniform(-0.04, 0.06)
    ctrl = [(gx, gy), (sg * 0.1, 0.0), (-0.08, 0.4), (-0.02, 0.62), (0.12, 0.86)]
    return ctrl, TUBE_HALF_WIDTH, TUBE_AMP, (gx, gy, 0.065, 0.045)


def device_effect(rng, spec: FindingSpec, lateral: bool) -> Effect:
    sg = -1 if spec.side == "right" else 1
    ctrl, hw, amp, gen = _lateral_device_path(rng, spec.shape) if lateral else _frontal_device_path(rng, spec.shape, sg)
    pts = bezier(ctrl)

    def line_d(g):
        return polyline_d(g.U, g.V, pts, hw)

    def dist(g):
        d = line_d(g)
        if gen is not None:
            gx_, gy_, rx, ry = gen
            box = np.maximum(np.abs(g.U - gx_) - rx, np.abs(g.V - gy_) - ry)
            d = np.minimum(d, box)
        return d

    def delta(g):
        out = amp * ramp(line_d(g), 0.003)
        if gen is not None:
            gx_, gy_, rx, ry = gen
            out = np.maximum(out, 0.75 * ramp(np.maximum(np.abs(g.U - gx_) - rx, np.abs(g.V - gy_) - ry), 0.006))
        return out

    us, vs = [p[0] for p in pts], [p[1] for p in pts]
    if gen is not None:
        us += [gen[0] - gen[2], gen[0] + gen[2]]
        vs += [gen[1] - gen[3], gen[1] + gen[3]]
    bounds = (min(us) - 0.03, min(vs) - 0.03, max(us) + 0.03, max(vs) + 0.03)
    return Effect("support_device", spec.side, "none", bounds, dist, delta, shape=spec.shape, soft=0.01, layer=2)


def _object_outline(rng, shape: str, cx: float, cy: float, size: float):
    """Integer annotation points of an object centred near (cx, cy) and its pixel distance function
    pd(X, Y) (< 0 inside): rectangle/ellipse from corners [[x1, y1], [x2, y2]], polygon from vertices."""
    if shape in ("rectangle", "ellipse"):
        hw_, hh_ = size * rng.uniform(0.5, 1.0), size * rng.uniform(0.5, 1.0)
        x1, y1 = int(round(cx - hw_)), int(round(cy - hh_))
        x2, y2 = max(x1 + 2, int(round(cx + hw_))), max(y1 + 2, int(round(cy + hh_)))
        points = [[x1, y1], [x2, y2]]
        if shape == "rectangle":  # pixels whose centres lie in [x1, x2] x [y1, y2]

            def pd(X, Y):
                return np.maximum(
                    np.abs(X - (x1 + x2 + 1) / 2) - (x2 - x1 + 1) / 2, np.abs(Y - (y1 + y2 + 1) / 2) - (y2 - y1 + 1) / 2
                )
        else:
            ex, ey, rx, ry = (x1 + x2 + 1) / 2, (y1 + y2 + 1) / 2, (x2 - x1 + 1) / 2, (y2 - y1 + 1) / 2

            def pd(X, Y):
                return (np.sqrt(np.square((X - ex) / rx) + np.square((Y - ey) / ry)) - 1.0) * min(rx, ry)

        return points, pd
    n = int(rng.integers(3, 8))
    # star-shaped around the centre: evenly spread angles (jittered) keep it from degenerating
    angles = (np.arange(n) + rng.uniform(-0.3, 0.3, n)) * (2 * np.pi / n) + rng.uniform(0, 2 * np.pi)
    radii = size * rng.uniform(0.55, 1.0, n)
    points = [[int(round(cx + r * math.cos(t))), int(round(cy + r * math.sin(t)))] for t, r in zip(angles, radii)]
    verts = [(px + 0.5, py + 0.5) for px, py in points]  # vertices on pixel centres

    def pd(X, Y):
        return np.where(inside_polygon(X, Y, verts), -1.0, 1.0).astype(np.float32)

    return points, pd


def object_effect(rng, spec: FindingSpec, geom: Geom) -> Effect:
    """Radiopaque object (button, coin, clip...) in image space, over the body (65 %) or anywhere in
    the collimated field, kept whole inside it."""
    fx0, fy0, fx1, fy1 = geom.field
    fw, fh = fx1 - fx0, fy1 - fy0
    size = max(6.0, min(fw, fh) * rng.uniform(0.02, 0.035 + 0.035 * spec.severity))
    if rng.random() < 0.65:
        u, v = rng.uniform(-0.6, 0.6), rng.uniform(0.05, 0.95)
        cx, cy = (float(c) for c in geom.to_pixel(u, v))
    else:
        cx, cy = rng.uniform(fx0 + 0.1 * fw, fx1 - 0.1 * fw), rng.uniform(fy0 + 0.1 * fh, fy1 - 0.1 * fh)
    cx = min(max(cx, fx0 + size + 2), fx1 - size - 2)
    cy = min(max(cy, fy0 + size + 2), fy1 - size - 2)
    amp = rng.uniform(0.55, 0.8)
    points, pd = _object_outline(rng, spec.shape, cx, cy, size)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    box = (min(xs) - 3, min(ys) - 3, max(xs) + 4, max(ys) + 4)

    def dist(g):
        return pd(g.X, g.Y)

    def delta(g):
        return amp * ramp(pd(g.X, g.Y), 0.6)  # sharp edge (pixel units)

    return Effect(
        "foreign_object", "none", "none", box, dist, delta, pixel_bounds=True, shape=spec.shape, layer=2, points=points
    )
