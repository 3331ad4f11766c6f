"""Where things are drawn: body coordinates, the patient's placement on the detector, sampling grids,
noise textures, and the signed-distance shapes every anatomy part and finding is built from.

Body coordinates (u, v): v = 0 at the lung apices, v = 1 at the costophrenic angles, u = 0 on the
midline, same unit horizontally; +u is the image's right (PA: patient's left). Lateral views: -u
anterior (image left), +u posterior (spine on the right). Distances are < 0 inside a shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage


def ramp(d: np.ndarray, eps: float) -> np.ndarray:
    """Soft inside-indicator of a signed distance d (< 0 inside): 1 deep inside, 0.5 on the edge."""
    return np.clip(0.5 - d * (1.0 / eps), 0.0, 1.0)


def piecewise(x: np.ndarray, xs: tuple[float, ...], ys: tuple[float, ...]) -> np.ndarray:
    """Piecewise-linear y(x) through (xs, ys), constant outside; 10x cheaper than np.interp on float32."""
    out = np.full_like(x, ys[0])
    for x0, x1, y0, y1 in zip(xs[:-1], xs[1:], ys[:-1], ys[1:]):
        out += np.clip(x - x0, 0.0, x1 - x0) * ((y1 - y0) / (x1 - x0))
    return out


@dataclass
class Geom:
    width: int
    height: int
    cx: float  # pixel x of (u=0, v=0.5)
    cy: float
    scale: float  # pixels per body unit
    cos: float
    sin: float
    field: tuple[int, int, int, int]  # collimated field [x0, y0, x1, y1) in pixels

    def to_pixel(self, u, v):
        dv = np.asarray(v, dtype=np.float64) - 0.5
        u = np.asarray(u, dtype=np.float64)
        return (
            self.cx + self.scale * (self.cos * u - self.sin * dv),
            self.cy + self.scale * (self.sin * u + self.cos * dv),
        )

    def pixel_box(self, bounds: tuple[float, float, float, float], margin_px: float) -> tuple[int, int, int, int]:
        """Pixel box [x0, y0, x1, y1) around body-coordinate bounds (u0, v0, u1, v1), clipped to the image."""
        u0, v0, u1, v1 = bounds
        xs, ys = self.to_pixel([u0, u1, u0, u1], [v0, v0, v1, v1])
        return (
            max(0, int(math.floor(xs.min() - margin_px))),
            max(0, int(math.floor(ys.min() - margin_px))),
            min(self.width, int(math.ceil(xs.max() + margin_px))),
            min(self.height, int(math.ceil(ys.max() + margin_px))),
        )


def place_patient(rng, width: int, height: int, lateral: bool) -> Geom:
    """Collimated field (random margins), body scale, tilt and position for one image."""
    margins = rng.uniform(0.015, 0.06, size=4)
    fx0, fy0 = int(round(margins[0] * width)), int(round(margins[1] * height))
    fx1, fy1 = width - int(round(margins[2] * width)), height - int(round(margins[3] * height))
    fw, fh = fx1 - fx0, fy1 - fy0
    half_extent = 0.66 if lateral else 0.7  # widest lung/body part that must stay in the field
    scale = min(rng.uniform(0.5, 0.6) * fh, fw * 0.9 / (2 * half_extent))
    angle = rng.uniform(-0.05, 0.05)
    cx = fx0 + fw * (0.5 + rng.uniform(-0.03, 0.03))
    apex = min(fy0 + fh * rng.uniform(0.08, 0.16), fy1 - 1.12 * scale)
    return Geom(width, height, cx, apex + 0.5 * scale, scale, math.cos(angle), math.sin(angle), (fx0, fy0, fx1, fy1))


class Textures:
    """Lazily made working-resolution noise fields, each from its own seed, so asking for one never
    changes another (or the anatomy)."""

    def __init__(self, seed: int, h: int, w: int, unit_px: float):
        self.seed, self.h, self.w, self.unit = seed, h, w, unit_px
        self.arrays: dict[str, np.ndarray] = {}

    def field(self, index: int, cell_units: float) -> np.ndarray:
        """Smooth zero-mean unit-std field with features ~cell_units body units, [h, w] float32."""
        cell = max(1.5, cell_units * self.unit)
        gh, gw = int(self.h / cell) + 3, int(self.w / cell) + 3
        rng = np.random.default_rng([self.seed, index])
        f = ndimage.gaussian_filter(rng.standard_normal((gh, gw), dtype=np.float32), 0.8, mode="wrap")
        f /= f.std() + 1e-6
        return np.asarray(Image.fromarray(f).resize((self.w, self.h), Image.Resampling.BILINEAR))

    def get(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            if name == "patch":  # blotchy 0..1 modulation for patchy opacities
                self.arrays[name] = np.clip(0.5 + 0.35 * self.field(1, 0.06), 0, 1)
            elif name == "fine":  # thin reticular network (fibrosis, air bronchograms)
                self.arrays[name] = np.exp(-np.square(self.field(2, 0.022) * 3.0))
            else:
                raise KeyError(name)
        return self.arrays[name]


class Grid:
    """Sample points: pixel-centre coordinates X [1, w], Y [h, 1] (output pixels) and body U, V [h, w]."""

    def __init__(self, geom: Geom, xs: np.ndarray, ys: np.ndarray, sl=None, tex: Textures | None = None):
        self.X = xs.astype(np.float32)[None, :]
        self.Y = ys.astype(np.float32)[:, None]
        dx = self.X - np.float32(geom.cx)
        dy = self.Y - np.float32(geom.cy)
        inv = np.float32(1.0 / geom.scale)
        self.U = (np.float32(geom.cos) * dx + np.float32(geom.sin) * dy) * inv
        self.V = (np.float32(geom.cos) * dy - np.float32(geom.sin) * dx) * inv + np.float32(0.5)
        self.sl = sl
        self._tex = tex

    def tex(self, name: str) -> np.ndarray:
        """A working-resolution texture, cut to this grid (only on working-grid boxes)."""
        return self._tex.get(name)[self.sl]


# ---------------------------------------------------------------------------------------------
# Shapes


def ellipse_d(U, V, cu, cv, rx, ry, angle=0.0, lobes=()):
    """Ellipse centred (cu, cv) with radii (rx, ry), rotated by `angle`; `lobes` ((k, amp, phase), ...)
    modulate the radius by 1 + sum(amp cos(k theta + phase)) for lobulated outlines."""
    du, dv = U - cu, V - cv
    if angle:
        ca, sa = math.cos(angle), math.sin(angle)
        du, dv = ca * du + sa * dv, ca * dv - sa * du
    r = np.sqrt(np.square(du * (1 / rx)) + np.square(dv * (1 / ry)))
    if lobes:
        theta = np.arctan2(dv, du)
        r = r / (1.0 + sum(amp * np.cos(k * theta + ph) for k, amp, ph in lobes))
    return (r - 1.0) * min(rx, ry)


def polyline_d(U, V, pts, half_width):
    """Tube of `half_width` around the polyline through `pts`."""
    best = None
    for (u0, v0), (u1, v1) in zip(pts[:-1], pts[1:]):
        du, dv = u1 - u0, v1 - v0
        t = np.clip(((U - u0) * du + (V - v0) * dv) * (1.0 / max(du * du + dv * dv, 1e-12)), 0.0, 1.0)
        d2 = np.square(U - u0 - t * du) + np.square(V - v0 - t * dv)
        best = d2 if best is None else np.minimum(best, d2)
    return np.sqrt(best) - half_width


def bezier(ctrl: list[tuple[float, float]], n: int = 14) -> list[tuple[float, float]]:
    """Points along the Bezier curve of `ctrl` (smooth tube/line paths)."""
    pts = np.asarray(ctrl, dtype=np.float64)
    out = []
    for t in np.linspace(0.0, 1.0, n):
        p = pts.copy()
        while len(p) > 1:
            p = (1 - t) * p[:-1] + t * p[1:]
        out.append((float(p[0, 0]), float(p[0, 1])))
    return out


def inside_polygon(X, Y, verts) -> np.ndarray:
    """Even-odd point-in-polygon test of pixel centres, [h, w] bool."""
    inside = np.zeros(np.broadcast_shapes(X.shape, Y.shape), dtype=bool)
    n = len(verts)
    for i in range(n):
        x0, y0 = verts[i]
        x1, y1 = verts[(i + 1) % n]
        if y0 == y1:
            continue
        crosses = (Y >= min(y0, y1)) & (Y < max(y0, y1))
        xint = x0 + (Y - y0) * ((x1 - x0) / (y1 - y0))
        inside ^= crosses & (X < xint)
    return inside
