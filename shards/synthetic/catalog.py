"""What the renderer can draw: finding kinds and where each may sit, dataset label -> kind maps, the
request/result types (FindingSpec, Region, Rendered), and `resolve_spec`, which fills a request's open
choices. No drawing here: anatomy.py, findings.py and devices.py draw, render.py composes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRONTAL = ("PA", "AP")
LATERAL = ("LATERAL", "LL", "LAT")

LR = ("right", "left")
THIRDS = ("upper", "middle", "lower")
# kind -> (allowed sides, allowed zones); the first entry of each is not a default, choice is random.
KIND_LOCATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "opacity": (LR, THIRDS),
    "consolidation": (LR, THIRDS),
    "pneumonia": (LR, THIRDS),
    "infiltration": (LR, THIRDS),
    "atelectasis": (LR, ("middle", "lower")),
    "nodule": (LR, THIRDS),
    "mass": (LR, THIRDS),
    "effusion": (("right", "left", "bilateral"), ("lower",)),
    "pneumothorax": (LR, ("apical", "diffuse")),
    "cardiomegaly": (("none",), ("none",)),
    "enlarged_cardiomediastinum": (("none",), ("upper",)),
    "edema": (("bilateral",), ("perihilar",)),
    "covid_opacity": (("bilateral", "right", "left"), ("peripheral",)),
    "emphysema": (("bilateral",), ("upper", "diffuse")),
    "fibrosis": (("bilateral", "right", "left"), ("lower",)),
    "pleural_thickening": (LR, ("apical", "lateral")),
    "hernia": (("none",), ("none",)),
    "fracture": (LR, THIRDS),
    "support_device": (("none", "right", "left"), ("none",)),
    "foreign_object": (("none",), ("none",)),
}
FINDING_KINDS = tuple(KIND_LOCATIONS)
KIND_ALIASES = {
    "covid": "covid_opacity",
    "lung_opacity": "opacity",
    "pleural_effusion": "effusion",
    "support_devices": "support_device",
    "foreign": "foreign_object",
}
DEVICE_SHAPES = ("ett", "ng_tube", "central_line", "pacemaker")
OBJECT_SHAPES = ("rectangle", "ellipse", "polygon")
# Object-CXR annotation type codes (T in "T x1 y1 x2 y2 ...") of the foreign_object shapes.
OBJECT_CXR_CODES = {"rectangle": 0, "ellipse": 1, "polygon": 2}
# Kinds a lateral view draws; the others are invisible there (no region).
LATERAL_KINDS = (
    "opacity",
    "consolidation",
    "pneumonia",
    "infiltration",
    "atelectasis",
    "nodule",
    "mass",
    "effusion",
    "cardiomegaly",
    "edema",
    "support_device",
    "foreign_object",
)
CXR14_KINDS = {
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Effusion": "effusion",
    "Infiltration": "infiltration",
    "Mass": "mass",
    "Nodule": "nodule",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
    "Consolidation": "consolidation",
    "Edema": "edema",
    "Emphysema": "emphysema",
    "Fibrosis": "fibrosis",
    "Pleural_Thickening": "pleural_thickening",
    "Hernia": "hernia",
}
# CheXpert label -> the kind that shows it (No Finding: draw nothing).
CHEXPERT_KINDS = {
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Consolidation": "consolidation",
    "Edema": "edema",
    "Enlarged Cardiomediastinum": "enlarged_cardiomediastinum",
    "Fracture": "fracture",
    "Lung Lesion": "nodule",
    "Lung Opacity": "opacity",
    "Pleural Effusion": "effusion",
    "Pleural Other": "pleural_thickening",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
    "Support Devices": "support_device",
}


@dataclass(frozen=True)
class FindingSpec:
    kind: str
    side: str | None = None
    zone: str | None = None
    severity: float | None = None
    shape: str | None = None


@dataclass
class Region:
    finding: str
    side: str
    zone: str
    box: list[int]  # [x1, y1, x2, y2], x2/y2 exclusive
    mask: np.ndarray  # [H, W] bool
    shape: str | None = None
    points: list[list[int]] | None = None


@dataclass
class Rendered:
    image: np.ndarray  # [H, W] uint8
    regions: list[Region]
    view: str


def resolve_spec(spec: FindingSpec, rng: np.random.Generator) -> FindingSpec:
    """Fill the spec's open choices (side, zone, severity, shape) and check the given ones."""
    kind = KIND_ALIASES.get(spec.kind, spec.kind)
    if kind not in KIND_LOCATIONS:
        raise ValueError(f"unknown finding kind {spec.kind!r}; known: {', '.join(FINDING_KINDS)}")
    sides, zones = KIND_LOCATIONS[kind]
    side = spec.side if spec.side is not None else str(rng.choice(sides))
    zone = spec.zone if spec.zone is not None else str(rng.choice(zones))
    if side not in sides:
        raise ValueError(f"finding {kind!r}: side {side!r} not in {sides}")
    if zone not in zones:
        raise ValueError(f"finding {kind!r}: zone {zone!r} not in {zones}")
    sev = float(spec.severity) if spec.severity is not None else float(rng.uniform(0.4, 1.0))
    if not 0.0 < sev <= 1.0:
        raise ValueError(f"finding {kind!r}: severity {sev} not in (0, 1]")
    shape = spec.shape
    if kind == "support_device":
        shape = shape or str(rng.choice(DEVICE_SHAPES))
        if shape not in DEVICE_SHAPES:
            raise ValueError(f"support_device shape {shape!r} not in {DEVICE_SHAPES}")
        if shape in ("ett", "ng_tube"):
            side = "none"
        elif side == "none":
            side = str(rng.choice(LR))
    elif kind == "foreign_object":
        shape = shape or str(rng.choice(OBJECT_SHAPES))
        if shape not in OBJECT_SHAPES:
            raise ValueError(f"foreign_object shape {shape!r} not in {OBJECT_SHAPES}")
    elif shape is not None:
        raise ValueError(f"finding {kind!r} takes no shape (got {shape!r})")
    return FindingSpec(kind, side, zone, sev, shape)
