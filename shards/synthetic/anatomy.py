"""The patient: frontal (PA/AP) and lateral anatomy as signed-distance shapes in body coordinates
(geometry.py), their base image, a random patient per image, and the findings that change anatomy
(cardiomegaly, a widened mediastinum, emphysema) rather than adding something on top."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shards.synthetic.catalog import FindingSpec
from shards.synthetic.geometry import Grid, Textures, piecewise, ramp


@dataclass
class Frontal:
    """Frontal (PA/AP) anatomy; every shape is a signed distance-like function of (U, V)."""

    lung_c0: float = 0.32  # |u| of a lung's centre line at the apex
    lung_hw: float = 0.26  # lung half-width below the apex
    lung_grow: float = 0.07  # extra half-width at the base
    apex_h: float = 0.30  # height of the rounded apex
    dome_base: tuple[float, float] = (0.97, 1.0)  # (patient right, left) costophrenic level
    dome_depth: float = 0.14
    heart_u: float = 0.08
    heart_v: float = 0.74
    heart_rx: float = 0.29
    heart_ry: float = 0.20
    heart_angle: float = 0.35
    med_w: float = 0.085
    med_extra: float = 0.0  # widening (enlarged cardiomediastinum)
    lung_dark: float = 0.30
    markings_amp: float = 0.075
    rib_spacing: float = 0.095
    rib_offset: float = 0.0
    tissue: float = 0.44
    bubble: bool = True

    @staticmethod
    def side_sign(side: str) -> int:
        return -1 if side == "right" else 1

    def lung_ch(self, V):
        t = np.clip(V * (1.0 / self.apex_h), 0.0, 1.0)
        h = self.lung_hw * np.sqrt(t * (2.0 - t)) + self.lung_grow * np.clip(
            (V - self.apex_h) / (1 - self.apex_h), 0, None
        )
        return self.lung_c0 + 0.02 * V, h

    def dome(self, a, sg: int):
        base = self.dome_base[0 if sg < 0 else 1]
        return base - self.dome_depth * np.clip(1.0 - np.square((a - 0.3) * (1 / 0.42)), 0.0, 1.0)

    def lung_lateral(self, U, V, sg: int):
        """a - (c + h): distance-like from the lateral/apical pleura, < 0 inside."""
        c, h = self.lung_ch(V)
        return sg * U - c - h

    def lung_d(self, U, V, sg: int):
        a = sg * U
        c, h = self.lung_ch(V)
        return np.maximum(np.maximum(np.abs(a - c) - h, V - self.dome(a, sg)), -V)

    def heart_d(self, U, V):
        du, dv = U - self.heart_u, V - self.heart_v
        ca, sa = math.cos(self.heart_angle), math.sin(self.heart_angle)
        x, y = ca * du + sa * dv, ca * dv - sa * du
        r = np.sqrt(np.square(x * (1 / self.heart_rx)) + np.square(y * (1 / self.heart_ry)))
        return (r - 1.0) * min(self.heart_rx, self.heart_ry)

    def med_d(self, U, V):
        bump = np.clip(1.0 - np.square((V - 0.3) * (1 / 0.32)), 0.0, 1.0)
        w = self.med_w + 0.03 * np.clip((V - 0.1) * 2.5, 0.0, 1.0) + self.med_extra * bump
        band = np.maximum(np.abs(U - 0.005) - w, V - 0.74)
        knob = np.sqrt(np.square(U - 0.09 - 0.6 * self.med_extra) + np.square(V - 0.25)) - 0.055
        return np.minimum(band, knob)

    def lung_eff_d(self, U, V, sg: int):
        return np.maximum(np.maximum(self.lung_d(U, V, sg), -self.heart_d(U, V)), -self.med_d(U, V))

    def body_d(self, U, V):
        # neck, shoulders, chest wall, abdomen
        return np.abs(U) - piecewise(
            V, (-1.2, -0.32, -0.14, 0.02, 0.2, 0.6, 1.2, 2.2), (0.2, 0.22, 0.74, 0.98, 0.86, 0.8, 0.78, 0.72)
        )

    def base(self, g: Grid, tex: Textures, ridge: np.ndarray) -> tuple[np.ndarray, dict]:
        """Base image [h, w] float (0..1 scale, before exposure) and the textures findings reuse."""
        U, V = g.U, g.V
        aU = np.abs(U)
        body = ramp(self.body_d(U, V), 0.02)
        img = 0.05 + body * (self.tissue + 0.1 * np.clip(1.0 - np.square(U * 1.25), 0, 1))
        heart = ramp(self.heart_d(U, V), 0.012)
        med = ramp(self.med_d(U, V), 0.012)
        lungs = np.maximum(ramp(self.lung_d(U, V, -1), 0.012), ramp(self.lung_d(U, V, 1), 0.012))
        lung_eff = lungs * (1.0 - heart) * (1.0 - med)
        hilum = np.exp(-(np.square(aU - 0.19) + np.square(V - 0.47)) * (1 / (2 * 0.06**2)))
        dark = lung_eff * (self.lung_dark * (1.0 - 0.2 * hilum))
        markings = lung_eff * ridge * (self.markings_amp * (0.35 + 0.65 * np.exp(-np.square(aU - 0.15) * 6.0)))
        img += markings - dark + 0.07 * hilum * lung_eff + 0.04 * heart
        # Ribs: posterior arcs falling laterally; brighter over the lungs than over soft tissue.
        phase = (V - 0.33 * aU * aU + 0.06 * aU - self.rib_offset) * (1.0 / self.rib_spacing)
        frac = phase - np.floor(phase)
        rib = np.exp(-np.square((frac - 0.5) * 5.5))
        cage = ramp(np.maximum(aU - 0.72, np.maximum(-0.06 - V, V - 1.02)), 0.03)
        img += rib * cage * (0.03 + 0.06 * lungs)
        # Clavicles, spine (vertebrae modulated), trachea, humeral heads.
        clav = -0.03 - 0.10 * aU + 0.12 * aU * aU
        img += 0.11 * np.exp(-np.square((V - clav) * (1 / 0.02))) * ramp(np.abs(aU - 0.29) - 0.24, 0.03)
        img += (0.10 + 0.04 * np.cos(V * (2 * np.pi / 0.085))) * ramp(aU - 0.055, 0.012) * body
        img -= 0.08 * ramp(np.maximum(np.abs(U - 0.005) - 0.03, np.maximum(V - 0.37, -0.9 - V)), 0.012)
        img += 0.10 * ramp(np.sqrt(np.square(aU - 0.88) + np.square(V + 0.02)) - 0.1, 0.02)
        if self.bubble:
            bub = np.sqrt(np.square((U - 0.34) * (1 / 0.1)) + np.square((V - self.dome_base[1] + 0.06) * (1 / 0.05)))
            img -= 0.12 * ramp((bub - 1.0) * 0.05, 0.01)
        return img, {"lung_dark": dark, "markings": markings, "tissue": img + dark - markings + 0.02}


@dataclass
class Lateral:
    """Lateral anatomy: one overlapping lung field, anterior heart, posterior spine, sternum."""

    lung_hw: float = 0.5
    heart_u: float = -0.17
    heart_v: float = 0.70
    heart_rx: float = 0.27
    heart_ry: float = 0.22
    lung_dark: float = 0.27
    markings_amp: float = 0.05
    tissue: float = 0.46

    @staticmethod
    def side_sign(side: str) -> int:
        return 1

    def lung_ch(self, V):
        t = np.clip(V * (1 / 0.55), 0.0, 1.0)
        return 0.04 + 0.04 * np.clip(1.0 - V * 2, 0.0, 1.0), self.lung_hw * np.sqrt(t * (2.0 - t))

    def dome(self, U):
        return 0.92 + 0.12 * np.square((U + 0.1) * (1 / 0.6))

    def lung_d(self, U, V, sg: int = 1):
        c, h = self.lung_ch(V)
        return np.maximum(np.maximum(np.abs(U - c) - h, V - self.dome(U)), -V)

    def heart_d(self, U, V):
        du, dv = U - self.heart_u, V - self.heart_v
        ca, sa = math.cos(-0.4), math.sin(-0.4)
        x, y = ca * du + sa * dv, ca * dv - sa * du
        r = np.sqrt(np.square(x * (1 / self.heart_rx)) + np.square(y * (1 / self.heart_ry)))
        return (r - 1.0) * min(self.heart_rx, self.heart_ry)

    def lung_eff_d(self, U, V, sg: int = 1):
        return np.maximum(self.lung_d(U, V), -self.heart_d(U, V))

    def body_d(self, U, V):
        return np.abs(U - 0.01) - piecewise(V, (-1.2, -0.3, -0.12, 0.2, 1.0, 2.2), (0.26, 0.3, 0.56, 0.63, 0.63, 0.6))

    def base(self, g: Grid, tex: Textures, ridge: np.ndarray) -> tuple[np.ndarray, dict]:
        """Base image [h, w] float (0..1 scale, before exposure) and the textures findings reuse."""
        U, V = g.U, g.V
        body = ramp(self.body_d(U, V), 0.02)
        img = 0.05 + body * self.tissue
        heart = ramp(self.heart_d(U, V), 0.015)
        lungs = ramp(self.lung_d(U, V), 0.015)
        lung_eff = lungs * (1.0 - 0.75 * heart)
        dark = self.lung_dark * lung_eff
        markings = self.markings_amp * ridge * lung_eff
        img += markings - dark + 0.05 * heart
        # Vertebral bodies with disc spaces, sternum, oblique ribs, raised arms, trachea.
        disc = np.cos(V * (2 * np.pi / 0.085))
        img += (0.11 + 0.05 * np.clip(disc * 3, -1, 1)) * ramp(np.abs(U - 0.53) - 0.07, 0.012) * body
        img += 0.08 * ramp(np.maximum(np.abs(U + 0.57) - 0.02, np.abs(V - 0.32) - 0.3), 0.01)
        phase = (V + 0.3 * U) * (1 / 0.1)
        img += 0.035 * np.exp(-np.square((phase - np.floor(phase) - 0.5) * 5)) * lungs
        arms = np.sqrt(np.square((U + 0.1) * (1 / 0.5)) + np.square((V + 0.12) * (1 / 0.1)))
        img += 0.1 * ramp((arms - 1.0) * 0.1, 0.02)
        img -= 0.07 * ramp(np.abs(U - 0.02 - 0.1 * V) - 0.03 + np.maximum(V - 0.38, 0) * 10, 0.012) * body
        return img, {"lung_dark": dark, "markings": markings, "tissue": img + dark - markings + 0.02}


def random_patient(rng: np.random.Generator, view: str, lateral: bool) -> Frontal | Lateral:
    """One patient's anatomy: lung size, dome levels, heart size/position (AP magnifies the heart),
    lung darkness, rib phase, soft-tissue density, gastric bubble."""
    if lateral:
        return Lateral(
            heart_rx=0.27 * rng.uniform(0.92, 1.08),
            lung_dark=0.27 * rng.uniform(0.9, 1.1),
            tissue=rng.uniform(0.42, 0.5),
        )
    return Frontal(
        lung_hw=0.26 * rng.uniform(0.94, 1.06),
        dome_base=(rng.uniform(0.95, 0.99), rng.uniform(0.98, 1.02)),
        dome_depth=rng.uniform(0.11, 0.17),
        heart_rx=0.29 * rng.uniform(0.9, 1.08) * (1.08 if view == "AP" else 1.0),
        heart_ry=0.2 * rng.uniform(0.92, 1.08),
        heart_u=rng.uniform(0.05, 0.1),
        lung_dark=0.3 * rng.uniform(0.88, 1.1),
        rib_offset=rng.uniform(0, 0.095),
        tissue=rng.uniform(0.4, 0.48),
        bubble=bool(rng.random() < 0.7),
    )


def modify_anatomy(spec: FindingSpec, anat: Frontal | Lateral) -> None:
    """Findings that are a change of anatomy rather than something added on top."""
    sev = spec.severity
    if spec.kind == "cardiomegaly":
        anat.heart_rx *= 1.25 + 0.25 * sev
        anat.heart_ry *= 1.06 + 0.1 * sev
        anat.heart_u += 0.03 if isinstance(anat, Frontal) else -0.03
    elif spec.kind == "enlarged_cardiomediastinum" and isinstance(anat, Frontal):
        anat.med_extra = 0.05 + 0.06 * sev
    elif spec.kind == "emphysema" and isinstance(anat, Frontal):
        anat.dome_depth *= 0.35
        anat.dome_base = (anat.dome_base[0] + 0.04, anat.dome_base[1] + 0.04)
        anat.lung_grow += 0.03
        anat.lung_dark *= 1.25
        anat.markings_amp *= 0.45
