"""Lung, pleural, cardiac and bone findings as drawable effects. Each kind has one function
`(rng, spec, anat, geom) -> list[Effect]` per view family (FRONTAL_FINDINGS, LATERAL_FINDINGS); the
spec arrives resolved (catalog.resolve_spec). Devices and foreign objects are in devices.py."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shards.synthetic.anatomy import Frontal, Lateral
from shards.synthetic.catalog import THIRDS, FindingSpec
from shards.synthetic.geometry import Geom, Grid, ellipse_d, ramp


@dataclass
class Effect:
    """One region's worth of drawing: `dist(grid)` < 0 is the region; `delta(grid)` the intensity
    change (None when the anatomy itself was changed, e.g. cardiomegaly), or with `blend` a
    (weight, target) pair that replaces what is there (fluid hides the lung and what is in it).
    Layers are drawn in order: 0 lung findings, 1 blends, 2 devices and objects (on top)."""

    finding: str
    side: str
    zone: str
    bounds: tuple[float, float, float, float]  # body (u0, v0, u1, v1) or pixel box
    dist: Callable[[Grid], np.ndarray]
    delta: Callable[[Grid], np.ndarray] | None
    pixel_bounds: bool = False
    shape: str | None = None
    points: list[list[int]] | None = None
    soft: float = 0.05  # how far (body units) the delta bleeds past the mask
    blend: bool = False
    layer: int = 0


ZONE_V = {"upper": (0.12, 0.36), "middle": (0.38, 0.60), "lower": (0.62, 0.86)}
BLOB_KINDS = ("opacity", "consolidation", "pneumonia", "infiltration", "nodule", "mass")


def pick_in_lung(rng, anat: Frontal, sg: int, zone: str, margin: float) -> tuple[float, float]:
    """A point (u, v) in the zone of one lung at least `margin` inside the visible lung."""
    v_lo, v_hi = ZONE_V.get(zone, (0.3, 0.8))
    last = None
    for _ in range(80):
        v = rng.uniform(v_lo, v_hi)
        c, h = anat.lung_ch(np.float32(v))
        u = float(sg * (c + h * rng.uniform(-0.75, 0.75)))
        last = (u, v)
        if float(anat.lung_eff_d(np.float32(u), np.float32(v), sg)) < -margin:
            return u, v
    # Only a tiny lung (e.g. huge heart) fails 80 draws; shrink the margin rather than fail.
    return last if margin < 0.005 else pick_in_lung(rng, anat, sg, zone, margin * 0.5)


def pick_lateral_u(rng, anat: Lateral, v, margin) -> float:
    """A u at height v at least `margin` inside the lateral lung field (the last draw after 60 misses)."""
    last = 0.0
    for _ in range(60):
        u = rng.uniform(-0.35, 0.4)
        last = u
        if float(anat.lung_eff_d(np.float32(u), np.float32(v))) < -margin:
            return u
    return last


def _sides(side: str) -> list[int]:
    return [-1, 1] if side == "bilateral" else [Frontal.side_sign(side)]


def _side_name(sg: int) -> str:
    return "right" if sg < 0 else "left"


def _hemi_bounds(sg: int, reach: float, v0: float, v1: float) -> tuple[float, float, float, float]:
    """Body bounds of one hemithorax from the midline out to `reach`, between heights v0 and v1."""
    return (min(0, sg * reach), v0, max(0, sg * reach), v1)


# ---------------------------------------------------------------------------------------------
# Blobs (opacity, consolidation, pneumonia, infiltration, nodule, mass): both views

# kind: (radius range, amplitude, edge softness, lobulation, texture)
BLOB_PARAMS = {
    "opacity": ((0.07, 0.12), 0.22, 0.05, 0.15, None),
    "consolidation": ((0.07, 0.12), 0.30, 0.02, 0.12, "fine"),
    "pneumonia": ((0.07, 0.12), 0.28, 0.035, 0.18, "patch"),
    "infiltration": ((0.07, 0.12), 0.20, 0.05, 0.2, "patch"),
    "nodule": ((0.018, 0.035), 0.34, 0.006, 0.0, None),
    "mass": ((0.05, 0.10), 0.32, 0.012, 0.1, None),
}


def blob_effect(rng, spec: FindingSpec, anat: Frontal | Lateral, lateral: bool) -> Effect:
    kind, side, zone, sev = spec.kind, spec.side, spec.zone, spec.severity
    sg = anat.side_sign(side)
    (r_lo, r_hi), amp, eps, lob, texture = BLOB_PARAMS[kind]
    r = r_lo + (r_hi - r_lo) * sev * rng.uniform(0.8, 1.0)
    rx, ry = r * rng.uniform(0.85, 1.2), r * rng.uniform(0.8, 1.15)
    angle = rng.uniform(-0.6, 0.6)
    lobes = tuple((k, rng.uniform(0, lob), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)) if lob else ()
    if lateral:
        v = rng.uniform(*ZONE_V[zone])
        u = pick_lateral_u(rng, anat, v, margin=min(r, 0.05))
    else:
        u, v = pick_in_lung(rng, anat, sg, zone, margin=min(r, 0.05) * 0.8)
    amp = amp * (0.7 + 0.3 * sev)

    def shape_d(g):
        return ellipse_d(g.U, g.V, u, v, rx, ry, angle, lobes)

    def dist(g):
        return np.maximum(shape_d(g), anat.lung_eff_d(g.U, g.V, sg))

    def delta(g):
        out = amp * ramp(shape_d(g), eps) * ramp(anat.lung_eff_d(g.U, g.V, sg), 0.012)
        if texture == "patch":
            out = out * (0.55 + 0.45 * g.tex("patch")) + 0.02 * g.tex("fine") * (out > 0)
        elif texture == "fine":  # air bronchograms: dark branching lines inside the consolidation
            out = out * (1.0 - 0.3 * g.tex("fine"))
        return out

    reach = 1.5 * max(rx, ry) * (1 + lob * 3) + eps
    return Effect(kind, side, zone, (u - reach, v - reach, u + reach, v + reach), dist, delta, soft=eps)


# ---------------------------------------------------------------------------------------------
# Frontal views


def _atelectasis(rng, spec: FindingSpec, anat: Frontal, geom: Geom) -> list[Effect]:
    sg, sev = anat.side_sign(spec.side), spec.severity
    u, v = pick_in_lung(rng, anat, sg, spec.zone, margin=0.06)
    rx, ry = rng.uniform(0.10, 0.15) * (0.75 + 0.25 * sev), rng.uniform(0.016, 0.026)
    angle = rng.uniform(-0.3, 0.3)
    amp = 0.28 * (0.75 + 0.25 * sev)

    def dist(g):
        return np.maximum(ellipse_d(g.U, g.V, u, v, rx, ry, angle), anat.lung_eff_d(g.U, g.V, sg))

    def delta(g):
        return amp * ramp(ellipse_d(g.U, g.V, u, v, rx, ry, angle), 0.01) * ramp(anat.lung_eff_d(g.U, g.V, sg), 0.01)

    return [
        Effect(
            spec.kind, spec.side, spec.zone, (u - rx - 0.05, v - rx - 0.05, u + rx + 0.05, v + rx + 0.05), dist, delta
        )
    ]


def _effusion(rng, spec: FindingSpec, anat: Frontal, geom: Geom) -> list[Effect]:
    """Basal fluid with a meniscus that rises laterally; blends the lung into soft tissue."""
    out = []
    level = 0.90 - 0.36 * spec.severity
    for sg in _sides(spec.side):

        def fluid_d(g, sg=sg):
            a = sg * g.U
            return (level - 0.09 * np.clip((a - 0.2) * (1 / 0.45), 0.0, 1.0) ** 1.5) - g.V

        # Default arguments bind this side's fluid_d: a plain closure would see the last side's
        # (the right lung of a bilateral effusion then had no meniscus).
        def dist(g, sg=sg, fluid_d=fluid_d):
            return np.maximum(fluid_d(g), anat.lung_eff_d(g.U, g.V, sg))

        def delta(g, sg=sg, fluid_d=fluid_d):
            hemi = (sg * g.U > 0).astype(np.float32)
            return ramp(fluid_d(g), 0.025) * hemi * np.minimum(g.tex("lung_dark") * 12.0, 1.0), g.tex("tissue")

        side = _side_name(sg) if spec.side == "bilateral" else spec.side
        out.append(
            Effect(
                spec.kind, side, spec.zone, _hemi_bounds(sg, 0.8, level - 0.15, 1.08), dist, delta, blend=True, layer=1
            )
        )
    return out


def _pneumothorax(rng, spec: FindingSpec, anat: Frontal, geom: Geom) -> list[Effect]:
    """Lucent rim without markings along the lateral pleura, with a bright visceral pleural line."""
    sg, sev = anat.side_sign(spec.side), spec.severity
    v_end, t0 = (0.45 + 0.12 * sev, 0.08 + 0.08 * sev) if spec.zone == "apical" else (1.0, 0.1 + 0.1 * sev)
    amp = 0.12 + 0.05 * sev

    def depth(V):
        return t0 * np.clip(1.0 - V * (1.0 / v_end), 0.0, 1.0) ** 0.6

    def ptx_d(g):
        return np.maximum(-depth(g.V) - anat.lung_lateral(g.U, g.V, sg), anat.lung_eff_d(g.U, g.V, sg))

    def delta(g):
        inside = ramp(ptx_d(g), 0.006)
        line_d = np.maximum(np.abs(anat.lung_lateral(g.U, g.V, sg) + depth(g.V)) - 0.004, anat.lung_eff_d(g.U, g.V, sg))
        line = ramp(np.maximum(line_d, g.V - 0.97 * v_end), 0.004)
        return -inside * (amp + g.tex("markings")) + 0.14 * line

    return [
        Effect(spec.kind, spec.side, spec.zone, _hemi_bounds(sg, 0.8, -0.05, min(1.05, v_end + 0.05)), ptx_d, delta)
    ]


def _cardiomegaly(rng, spec: FindingSpec, anat: Frontal, geom: Geom) -> list[Effect]:
    # drawn by anatomy.modify_anatomy; the region is the enlarged heart
    return [Effect(spec.kind, "none", "none", (-0.75, 0.2, 0.85, 1.2), lambda g: anat.heart_d(g.U, g.V), None)]


def _enlarged_cardiomediastinum(rng, spec: FindingSpec, anat: Frontal, geom: Geom) -> list[Effect]:
    # drawn by anatomy.modify_anatomy; the region is the upper mediastinum
    return [
        Effect(
            spec.kind,
            "none",
            spec.zone,
            (-0.4, -0.05, 0.45, 0.65),
            lambda g: np.maximum(anat.med_d(g.U, g.V), np.maximum(0.02 - g.V, g.V - 0.6)),
            None,
        )
    ]


def _edema(rng, spec: FindingSpec, anat: Frontal, geom: Geom) -> list[Effect]:
    """Bilateral perihilar haze, one region per lung."""
    out = []
    sev = spec.severity
    amp = 0.14 + 0.1 * sev
    for sg in _sides("bilateral"):
        cu, cv = sg * 0.24, 0.52

        def hz_d(g, cu=cu, cv=cv):
            return ellipse_d(g.U, g.V, cu, cv, 0.24 + 0.04 * sev, 0.28 + 0.04 * sev)

        def dist(g, sg=sg, hz_d=hz_d):
            return np.maximum(hz_d(g), anat.lung_eff_d(g.U, g.V, sg))

        def delta(g, sg=sg, hz_d=hz_d):
            return (
                amp * ramp(hz_d(g), 0.14) * (0.75 + 0.25 * g.tex("patch")) * ramp(anat.lung_eff_d(g.U, g.V, sg), 0.015)
            )

        out.append(
            Effect(spec.kind, _side_name(sg), spec.zone, (cu - 0.45, cv - 0.45, cu + 0.45, cv + 0.45), dist, delta)
        )
    return out


def _peripheral(rng, spec: FindingSpec, anat: Frontal, geom: Geom) -> list[Effect]:
    """covid_opacity (patchy ground glass) and fibrosis (reticulation): a band along the lateral
    pleura below a height that rises with severity."""
    out = []
    kind, sev = spec.kind, spec.severity
    for sg in _sides(spec.side):
        if kind == "covid_opacity":
            thick, top, amp, eps = 0.15 + 0.07 * sev, 0.38 - 0.1 * sev, 0.13 + 0.08 * sev, 0.05
        else:
            thick, top, amp, eps = 0.14 + 0.06 * sev, 0.5 - 0.1 * sev, 0.08 + 0.05 * sev, 0.03

        def env_d(g, sg=sg, thick=thick, top=top):
            return np.maximum(
                np.maximum(-thick - anat.lung_lateral(g.U, g.V, sg), top - g.V), anat.lung_eff_d(g.U, g.V, sg)
            )

        def delta(g, env_d=env_d, amp=amp, eps=eps):
            env = ramp(env_d(g), eps)
            if kind == "covid_opacity":
                return amp * env * (0.45 + 0.55 * g.tex("patch"))
            return env * (amp * 0.4 + amp * 1.6 * g.tex("fine"))

        side = _side_name(sg) if spec.side == "bilateral" else spec.side
        out.append(Effect(kind, side, spec.zone, _hemi_bounds(sg, 0.8, top - 0.05, 1.08), env_d, delta))
    return out


def _emphysema(rng, spec: FindingSpec, anat: Frontal, geom: Geom) -> list[Effect]:
    """Hyperinflation is an anatomy change (modify_anatomy); this draws the bullae, one region per lung."""
    out = []
    zone, sev = spec.zone, spec.severity
    for sg in (-1, 1):
        bullae = []
        for _ in range(int(rng.integers(1, 4))):
            u, v = pick_in_lung(rng, anat, sg, "upper" if zone == "upper" else str(rng.choice(THIRDS)), margin=0.05)
            bullae.append((u, v, rng.uniform(0.035, 0.06) * (0.7 + 0.3 * sev)))

        def dist(g, sg=sg):  # the whole lung is hyperinflated; `zone` says where the bullae are
            return anat.lung_eff_d(g.U, g.V, sg)

        def delta(g, bullae=bullae, sg=sg):
            out_ = np.zeros(np.broadcast_shapes(g.U.shape, g.V.shape), np.float32)
            for u, v, r in bullae:
                d = np.sqrt(np.square(g.U - u) + np.square(g.V - v)) - r
                out_ += -0.09 * ramp(d, 0.006) + 0.07 * ramp(np.abs(d) - 0.003, 0.003)
            return out_ * ramp(anat.lung_eff_d(g.U, g.V, sg), 0.01)

        out.append(Effect(spec.kind, _side_name(sg), zone, _hemi_bounds(sg, 0.8, -0.05, 1.08), dist, delta))
    return out


def _pleural_thickening(rng, spec: FindingSpec, anat: Frontal, geom: Geom) -> list[Effect]:
    """An apical cap, or a band along the lateral pleura between two random heights."""
    sg, sev = anat.side_sign(spec.side), spec.severity
    t = 0.022 + 0.018 * sev
    if spec.zone == "apical":
        cap = 0.05 + 0.04 * sev

        def dist(g):
            return np.maximum(anat.lung_eff_d(g.U, g.V, sg), g.V - cap)

        bounds = _hemi_bounds(sg, 0.7, -0.05, cap + 0.05)
    else:
        v0 = rng.uniform(0.25, 0.45)
        v1 = v0 + rng.uniform(0.25, 0.4)

        def dist(g):
            return np.maximum(
                np.maximum(-t - anat.lung_lateral(g.U, g.V, sg), np.maximum(v0 - g.V, g.V - v1)),
                anat.lung_eff_d(g.U, g.V, sg),
            )

        bounds = _hemi_bounds(sg, 0.8, v0 - 0.05, v1 + 0.05)

    def delta(g):
        return (0.24 + 0.06 * sev) * ramp(dist(g), 0.006)

    return [Effect(spec.kind, spec.side, spec.zone, bounds, dist, delta)]


def _hernia(rng, spec: FindingSpec, anat: Frontal, geom: Geom) -> list[Effect]:
    """Retrocardiac round bubble with an air-fluid level."""
    sev = spec.severity
    cu, cv = rng.uniform(-0.02, 0.08), anat.heart_v + rng.uniform(0.0, 0.06)
    r = 0.07 + 0.04 * sev
    level = cv - 0.2 * r

    def dist(g):
        return np.sqrt(np.square(g.U - cu) + np.square(g.V - cv)) - r

    def delta(g):
        inside = ramp(dist(g), 0.006)
        air = ramp(g.V - level, 0.004)
        wall = ramp(np.abs(dist(g)) - 0.004, 0.003)
        return inside * (0.12 - 0.36 * air) + 0.08 * wall

    return [
        Effect(spec.kind, "none", "none", (cu - r - 0.05, cv - r - 0.05, cu + r + 0.05, cv + r + 0.05), dist, delta)
    ]


def _fracture(rng, spec: FindingSpec, anat: Frontal, geom: Geom) -> list[Effect]:
    """A gap with callus on one posterior rib arc (the arcs of Frontal.base) in the requested zone."""
    sg, sev = anat.side_sign(spec.side), spec.severity
    a = rng.uniform(0.46, 0.58)
    v_lo, v_hi = ZONE_V[spec.zone]
    curve = 0.33 * a * a - 0.06 * a + anat.rib_offset
    k_lo = math.ceil((v_lo - curve) / anat.rib_spacing - 0.5)
    k_hi = max(k_lo, math.floor((v_hi - curve) / anat.rib_spacing - 0.5))
    k = int(rng.integers(k_lo, k_hi + 1))
    u, v = sg * a, curve + (k + 0.5) * anat.rib_spacing
    rx, ry = 0.03 + 0.01 * sev, 0.022 + 0.008 * sev

    def dist(g):
        return ellipse_d(g.U, g.V, u, v, rx, ry)

    def delta(g):
        gap = ramp(np.maximum(np.abs(g.U - u) - 0.005, np.abs(g.V - v) - 0.03), 0.003)
        return 0.14 * ramp(dist(g), 0.012) - 0.2 * gap

    return [Effect(spec.kind, spec.side, spec.zone, (u - 0.08, v - 0.08, u + 0.08, v + 0.08), dist, delta)]


def _frontal_blob(rng, spec: FindingSpec, anat: Frontal, geom: Geom) -> list[Effect]:
    return [blob_effect(rng, spec, anat, lateral=False)]


# ---------------------------------------------------------------------------------------------
# Lateral views (one overlapping lung field: sides are not told apart)


def _lateral_blob(rng, spec: FindingSpec, anat: Lateral, geom: Geom) -> list[Effect]:
    return [blob_effect(rng, spec, anat, lateral=True)]


def _lateral_atelectasis(rng, spec: FindingSpec, anat: Lateral, geom: Geom) -> list[Effect]:
    v = rng.uniform(*ZONE_V[spec.zone])
    u = pick_lateral_u(rng, anat, v, 0.08)
    rx, ry, angle = rng.uniform(0.1, 0.15), rng.uniform(0.016, 0.026), rng.uniform(-0.3, 0.3)

    def dist(g):
        return np.maximum(ellipse_d(g.U, g.V, u, v, rx, ry, angle), anat.lung_eff_d(g.U, g.V))

    def delta(g):
        return 0.26 * ramp(ellipse_d(g.U, g.V, u, v, rx, ry, angle), 0.01) * ramp(anat.lung_eff_d(g.U, g.V), 0.01)

    return [Effect(spec.kind, spec.side, spec.zone, (u - 0.2, v - 0.2, u + 0.2, v + 0.2), dist, delta)]


def _lateral_effusion(rng, spec: FindingSpec, anat: Lateral, geom: Geom) -> list[Effect]:
    """Fluid in the posterior costophrenic sulcus (higher posteriorly), blended into soft tissue."""
    level = 0.9 - 0.3 * spec.severity

    def fluid_d(g):
        return (level - 0.12 * np.clip(g.U * 2.0, 0.0, 1.0)) - g.V

    def dist(g):
        return np.maximum(fluid_d(g), anat.lung_eff_d(g.U, g.V))

    def delta(g):
        return ramp(fluid_d(g), 0.025) * np.minimum(g.tex("lung_dark") * 12.0, 1.0), g.tex("tissue")

    return [Effect(spec.kind, spec.side, spec.zone, (-0.7, level - 0.2, 0.7, 1.12), dist, delta, blend=True, layer=1)]


def _lateral_cardiomegaly(rng, spec: FindingSpec, anat: Lateral, geom: Geom) -> list[Effect]:
    # drawn by anatomy.modify_anatomy; the region is the enlarged heart
    return [Effect(spec.kind, "none", "none", (-0.8, 0.2, 0.4, 1.2), lambda g: anat.heart_d(g.U, g.V), None)]


def _lateral_edema(rng, spec: FindingSpec, anat: Lateral, geom: Geom) -> list[Effect]:
    amp = 0.12 + 0.08 * spec.severity

    def dist(g):
        return np.maximum(ellipse_d(g.U, g.V, 0.05, 0.52, 0.3, 0.3), anat.lung_eff_d(g.U, g.V))

    def delta(g):
        return amp * ramp(ellipse_d(g.U, g.V, 0.05, 0.52, 0.3, 0.3), 0.14) * ramp(anat.lung_eff_d(g.U, g.V), 0.015)

    return [Effect(spec.kind, "bilateral", spec.zone, (-0.45, 0.0, 0.55, 1.0), dist, delta)]


# kind -> effect builder. Devices and foreign objects (devices.py) complete both tables in render.py.
FindingFn = Callable[[np.random.Generator, FindingSpec, Frontal | Lateral, Geom], list[Effect]]
FRONTAL_FINDINGS: dict[str, FindingFn] = {
    **dict.fromkeys(BLOB_KINDS, _frontal_blob),
    "atelectasis": _atelectasis,
    "effusion": _effusion,
    "pneumothorax": _pneumothorax,
    "cardiomegaly": _cardiomegaly,
    "enlarged_cardiomediastinum": _enlarged_cardiomediastinum,
    "edema": _edema,
    "covid_opacity": _peripheral,
    "fibrosis": _peripheral,
    "emphysema": _emphysema,
    "pleural_thickening": _pleural_thickening,
    "hernia": _hernia,
    "fracture": _fracture,
}
LATERAL_FINDINGS: dict[str, FindingFn] = {
    **dict.fromkeys(BLOB_KINDS, _lateral_blob),
    "atelectasis": _lateral_atelectasis,
    "effusion": _lateral_effusion,
    "cardiomegaly": _lateral_cardiomegaly,
    "edema": _lateral_edema,
}
