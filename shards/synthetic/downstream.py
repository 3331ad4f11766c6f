"""Synthetic native-format downstream datasets: small look-alikes of the six real downloads.

`write_all(out, n, seed)` writes `<out>/<name>/` for every converter in shards.downstream, laid out
like the real download (file names, csv headers and quirks, DICOM file meta, RLE, annotation strings),
so the converters run unchanged on them. Images come from the shared renderer
(shards.synthetic.render), and every label, box and mask is taken from what it actually drew:

  rsna_pneumonia     1024x1024 DICOMs; positives have 1-2 focal opacities, one csv row per box
  siim_pneumothorax  1024x1024 DICOMs under <study>/<series>/; positives have a pneumothorax region,
                     some two (two csv rows, united by the converter); " -1" rows for negatives
  chexpert           CheXpert-v1.0-small/{train,valid}.csv + ~320x390 JPEGs, frontal and lateral
                     rows; the 5 competition findings are drawn when their label (after the
                     uncertainty policy) is 1
  covidx             train/test lists + PNG/JPEG of varied size (one 16-bit PNG, RGB JPEGs); COVID-19
                     = bilateral peripheral opacities, pneumonia = a focal opacity
  object_cxr         train.csv/dev.csv + JPEGs of varied size; foreign objects drawn as rectangles,
                     ellipses and polygons, annotated with their native type codes
  chestxray14        Data_Entry_2017.csv + split lists + 1024x1024 PNGs under images_001/images/

DICOM variety (by image index, so every fixture of >= 10 images has each): 8-bit MONOCHROME2
(most), 8-bit MONOCHROME1, 12-bit with rescale and a window, 12-bit MONOCHROME1 with rescale and no
window, JPEG Baseline (RSNA) / RLE Lossless (SIIM) transfer syntaxes.
Deterministic for a seed: image i of a dataset uses its own generator seeded by (seed, dataset, i),
so output does not depend on the worker count.
"""

from __future__ import annotations

import csv
import io
import uuid
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
)

from common.io import atomic_open, atomic_write_bytes
from shards.dicom import rle_encode
from shards.synthetic.render import (
    CHEXPERT_KINDS,
    CXR14_KINDS,
    OBJECT_CXR_CODES,
    OBJECT_SHAPES,
    FindingSpec,
    render_radiograph,
)

# Digital X-ray image storage - for presentation.
DX_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")
DATASETS = ("rsna_pneumonia", "siim_pneumothorax", "chexpert", "covidx", "object_cxr", "chestxray14")


# ---------------------------------------------------------------------------------------------
# DICOM writing


def write_dicom(
    path: str | Path,
    gray: np.ndarray,
    *,
    patient_id: str,
    sop_uid: str,
    study_uid: str = "",
    series_uid: str = "",
    encoding: str = "mono2",
    transfer_syntax: UID = ExplicitVRLittleEndian,
) -> None:
    """Write the display image `gray` [H, W] uint8 (air dark) as a DICOM file that decodes back to it.

    encoding:
      "mono2"        8-bit MONOCHROME2, stored = gray (RSNA/SIIM's usual form)
      "mono1"        8-bit MONOCHROME1, stored = 255 - gray
      "12bit_window" 12-bit, stored = 16*gray + 8, rescale slope 1 intercept -1024, with a
                     WindowCenter/Width that maps the stored range exactly back onto 0..255
      "12bit"        12-bit MONOCHROME1 with rescale and no window (the reader's percentile path)
    transfer_syntax: Explicit VR Little Endian, RLE Lossless (pydicom's own encoder) or JPEG
      Baseline (8-bit only; encoded with Pillow and encapsulated, like many RSNA files).
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = DX_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or sop_uid + ".1"
    ds.SeriesInstanceUID = series_uid or sop_uid + ".2"
    ds.PatientID = patient_id
    ds.PatientName = patient_id
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = int(gray.shape[0]), int(gray.shape[1])
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    if encoding in ("mono2", "mono1"):
        ds.PhotometricInterpretation = "MONOCHROME2" if encoding == "mono2" else "MONOCHROME1"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        stored = (gray if encoding == "mono2" else 255 - gray).astype(np.uint8)
    elif encoding in ("12bit_window", "12bit"):
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        if encoding == "12bit_window":
            ds.PhotometricInterpretation = "MONOCHROME2"
            stored = gray.astype(np.uint16) * 16 + 8
            # modality m = 16 g - 1016; the PS3.3 linear window gives (m - (c - 0.5)) / (w - 1) + 0.5,
            # which equals g / 255 for every g when w - 1 = 16 * 255 and c - 0.5 = 1024
            ds.WindowWidth = 16 * 255 + 1
            ds.WindowCenter = 1024.5
        else:
            ds.PhotometricInterpretation = "MONOCHROME1"
            stored = (255 - gray).astype(np.uint16) * 16 + 8
    else:
        raise ValueError(f"unknown DICOM encoding {encoding!r}")
    if transfer_syntax == JPEGBaseline8Bit:
        if ds.BitsStored != 8:
            raise ValueError("JPEG Baseline holds 8-bit data only")
        buf = io.BytesIO()
        Image.fromarray(stored).save(buf, format="JPEG", quality=95)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    else:
        ds.PixelData = stored.tobytes()
        if transfer_syntax == RLELossless:
            # pydicom gives a compressed dataset a fresh random SOP Instance UID by default: keep ours,
            # so the file matches its name (as in SIIM) and the corpus is byte-identical for a seed.
            ds.compress(RLELossless, generate_instance_uid=False)
        elif transfer_syntax != ExplicitVRLittleEndian:
            raise ValueError(f"write_dicom cannot encode {UID(transfer_syntax).name}")
    with atomic_open(path, "wb") as fh:
        ds.save_as(fh, enforce_file_format=True)


def _dicom_encoding(i: int) -> str:
    return {3: "mono1", 5: "12bit_window", 7: "12bit"}.get(i % 10, "mono2")


def _uid(rng: np.random.Generator, root: str) -> str:
    return f"{root}.{int(rng.integers(1000, 99999))}.{int(rng.integers(1e9, 2e9))}.{int(rng.integers(1e5, 1e6))}"


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _save_image(path: Path, gray: np.ndarray, fmt: str) -> None:
    buf = io.BytesIO()
    if fmt == "JPEG":
        Image.fromarray(gray).save(buf, format="JPEG", quality=90)
    elif fmt == "JPEG-RGB":
        Image.fromarray(gray).convert("RGB").save(buf, format="JPEG", quality=90)
    elif fmt == "PNG16":
        Image.fromarray(gray.astype(np.uint16) * 257).save(buf, format="PNG")
    else:
        Image.fromarray(gray).save(buf, format="PNG", compress_level=1)
    atomic_write_bytes(path, buf.getvalue())


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with atomic_open(path, "w") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _fmt(v: float) -> str:
    return f"{float(v):.1f}"


# ---------------------------------------------------------------------------------------------
# One image per job (runs in worker processes); each returns the rows its dataset's files need.


@dataclass
class _Job:
    dataset: str
    root: str
    index: int
    seed: int
    extra: dict


def _rng(job: _Job) -> np.random.Generator:
    return np.random.default_rng([job.seed, zlib.crc32(job.dataset.encode()), job.index])


def _rsna(job: _Job) -> dict:
    rng = _rng(job)
    pid = _uuid(rng)
    n_boxes = int(rng.choice([1, 2], p=[0.6, 0.4])) if rng.random() < 0.35 else 0
    sides = ["right", "left"][:n_boxes] if n_boxes == 2 else [str(rng.choice(["right", "left"]))] * n_boxes
    out = render_radiograph(rng, [FindingSpec("pneumonia", side=s) for s in sides], 1024, 1024)
    boxes = [r.box for r in out.regions]
    ts = JPEGBaseline8Bit if job.index % 10 == 8 else ExplicitVRLittleEndian
    write_dicom(
        Path(job.root) / "stage_2_train_images" / f"{pid}.dcm",
        out.image,
        patient_id=pid,
        sop_uid=_uid(rng, "1.2.276.0.7230010.3.1.4.8323329"),
        encoding=_dicom_encoding(job.index),
        transfer_syntax=ts,
    )
    rows = [[pid, _fmt(x1), _fmt(y1), _fmt(x2 - x1), _fmt(y2 - y1), 1] for x1, y1, x2, y2 in boxes]
    return {"rows": rows or [[pid, "", "", "", "", 0]]}


def _siim(job: _Job) -> dict:
    rng = _rng(job)
    image_id = _uid(rng, "1.2.276.0.7230010.3.1.4.8323329")
    study, series = _uid(rng, "1.2.276.0.7230010.3.1.2.8323329"), _uid(rng, "1.2.276.0.7230010.3.1.3.8323329")
    n_regions = int(rng.choice([1, 2], p=[0.7, 0.3])) if rng.random() < 0.35 else 0
    sides = ["right", "left"][:n_regions] if n_regions == 2 else [str(rng.choice(["right", "left"]))] * n_regions
    out = render_radiograph(rng, [FindingSpec("pneumothorax", side=s) for s in sides], 1024, 1024)
    # pydicom's pure-Python RLE encoder costs ~0.4 s per 1024x1024 image: a few files suffice.
    ts = RLELossless if job.index % 20 == 6 else ExplicitVRLittleEndian
    path = Path(job.root) / "dicom-images-train" / study / series / f"{image_id}.dcm"
    write_dicom(
        path,
        out.image,
        patient_id=_uuid(rng),
        sop_uid=image_id,
        study_uid=study,
        series_uid=series,
        encoding=_dicom_encoding(job.index),
        transfer_syntax=ts,
    )
    runs = [rle_encode(r.mask) for r in out.regions]
    return {"rows": [[image_id, f" {rle}"] for rle in runs] or [[image_id, " -1"]]}


def _drawn(out, kinds: dict[str, str]) -> list[str]:
    """Label names (keys of `kinds`) whose finding kind has a region in the rendered image."""
    seen = {r.finding for r in out.regions}
    return [name for name, kind in kinds.items() if kind in seen]


def _chexpert(job: _Job) -> dict:
    rng = _rng(job)
    e = job.extra
    findings = [FindingSpec(CHEXPERT_KINDS[name]) for name in e["drawn"]] if e["frontal"] else []
    out = render_radiograph(rng, findings, e["width"], e["height"], view="PA" if e["frontal"] else "LAT")
    _save_image(Path(job.root) / e["rel"], out.image, "JPEG")
    return {"drawn": _drawn(out, CHEXPERT_KINDS)}


def _covidx(job: _Job) -> dict:
    rng = _rng(job)
    e = job.extra
    findings = {
        "normal": [],
        "pneumonia": [FindingSpec("pneumonia")],
        "COVID-19": [FindingSpec("covid_opacity", side="bilateral")],
    }[e["cls"]]
    out = render_radiograph(rng, findings, e["width"], e["height"])
    _save_image(Path(job.root) / e["rel"], out.image, e["fmt"])
    return {"drawn": bool(out.regions)}


def _object_cxr(job: _Job) -> dict:
    rng = _rng(job)
    e = job.extra
    findings = [FindingSpec("foreign_object", shape=shape) for shape in e["shapes"]]
    out = render_radiograph(rng, findings, e["width"], e["height"])
    _save_image(Path(job.root) / e["rel"], out.image, "JPEG")
    return {"annotation": ";".join(_annotate(r) for r in out.regions)}


def _chestxray14(job: _Job) -> dict:
    rng = _rng(job)
    e = job.extra
    out = render_radiograph(rng, [FindingSpec(CXR14_KINDS[name]) for name in e["findings"]], 1024, 1024)
    _save_image(Path(job.root) / e["rel"], out.image, "PNG")
    return {"drawn": _drawn(out, CXR14_KINDS)}


_JOBS = {
    "rsna_pneumonia": _rsna,
    "siim_pneumothorax": _siim,
    "chexpert": _chexpert,
    "covidx": _covidx,
    "object_cxr": _object_cxr,
    "chestxray14": _chestxray14,
}


def _run(job: _Job) -> dict:
    return _JOBS[job.dataset](job)


# ---------------------------------------------------------------------------------------------
# Planning (main process): which images exist and what their labels are; then the label files.


def _plan_rng(seed: int, dataset: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(dataset.encode()), 1 << 20])


CHEXPERT_COLUMNS = [
    "Path",
    "Sex",
    "Age",
    "Frontal/Lateral",
    "AP/PA",
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]
CHEXPERT_FIVE = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
CHEXPERT_U_ONES = ("Atelectasis", "Edema", "Pleural Effusion")


def _plan_chexpert(root: Path, n: int, rng: np.random.Generator) -> tuple[list[dict], Callable]:
    base = "CheXpert-v1.0-small"
    tables: dict[str, list[list]] = {"train": [], "valid": []}
    plans = []
    for split, count, first_patient in (("train", n, 1), ("valid", max(4, n // 5), 64541)):
        patient = first_patient
        while sum(1 for p in plans if p["split"] == split) < count:
            for study in range(1, int(rng.integers(1, 3)) + 1):
                values = {}
                for name in CHEXPERT_FIVE:
                    values[name] = str(rng.choice(["1.0", "0.0", "-1.0", ""], p=[0.25, 0.3, 0.1, 0.35]))
                # What the converter will call positive (blank -> 0, -1 -> per-label policy): draw it.
                drawn = [k for k, v in values.items() if v == "1.0" or (v == "-1.0" and k in CHEXPERT_U_ONES)]
                sex, age = str(rng.choice(["Male", "Female"])), int(rng.integers(18, 90))
                views = [("view1_frontal", "Frontal")] + ([("view2_lateral", "Lateral")] if rng.random() < 0.25 else [])
                width, height = (320, int(rng.integers(320, 400))) if rng.random() < 0.85 else (390, 320)
                study_rows = list(range(len(tables[split]), len(tables[split]) + len(views)))
                for view, kind in views:
                    rel = f"{base}/{split}/patient{patient:05d}/study{study}/{view}.jpg"
                    row = {c: "" for c in CHEXPERT_COLUMNS}
                    row.update(
                        {
                            "Path": rel,
                            "Sex": sex,
                            "Age": age,
                            "Frontal/Lateral": kind,
                            "AP/PA": str(rng.choice(["AP", "PA"])) if kind == "Frontal" else "",
                            "No Finding": "" if drawn else "1.0",
                            **values,
                        }
                    )
                    if rng.random() < 0.2:
                        row["Support Devices"] = "1.0"
                    tables[split].append([row[c] for c in CHEXPERT_COLUMNS])
                    plans.append(
                        {
                            "split": split,
                            "rel": rel,
                            "frontal": kind == "Frontal",
                            "drawn": drawn,
                            "width": width,
                            "height": height,
                            "rows": study_rows,
                        }
                    )
            patient += 1

    def finish(results: list[dict]) -> None:
        # A planned finding the renderer could not show (no region) is written as a negative.
        for plan, res in zip(plans, results):
            missing = set(plan["drawn"]) - set(res["drawn"]) if plan["frontal"] else set()
            for i in plan["rows"] if missing else []:
                row = tables[plan["split"]][i]
                for name in missing:
                    row[CHEXPERT_COLUMNS.index(name)] = "0.0"
                if not set(plan["drawn"]) - missing:
                    row[CHEXPERT_COLUMNS.index("No Finding")] = "1.0"
        for split, rows in tables.items():
            _write_csv(root / base / f"{split}.csv", CHEXPERT_COLUMNS, rows)

    return plans, finish


COVIDX_SOURCES = ("cohen", "rsna", "actmed", "sirm", "ricord", "bimcv")


def _plan_covidx(root: Path, n: int, rng: np.random.Generator) -> tuple[list[dict], Callable]:
    plans, lines = [], {"train": [], "test": []}
    for which, count, pid0 in (("train", n, 100), ("test", max(6, n // 5), 90000)):
        pid, i = pid0, 0
        while i < count:
            for _ in range(min(int(rng.choice([1, 2], p=[0.7, 0.3])), count - i)):
                cls = (
                    ("normal", "pneumonia", "COVID-19")[i % 3]
                    if which == "test"
                    else str(rng.choice(["normal", "pneumonia", "COVID-19"]))
                )
                style = len(plans) % 4
                name, fmt = [
                    (f"{_uuid(rng)}.png", "PNG"),
                    (f"COVID-19({len(plans)}).png", "PNG"),
                    (f"person{pid}_virus_{i}.jpeg", "JPEG-RGB"),
                    (f"{len(plans):05d}.jpg", "JPEG"),
                ][style]
                if len(plans) == 5:
                    fmt = "PNG16"
                width = int(rng.integers(256, 512))
                plans.append(
                    {
                        "rel": f"{which}/{name}",
                        "cls": cls,
                        "fmt": fmt,
                        "width": width,
                        "height": int(width * rng.uniform(0.9, 1.25)),
                    }
                )
                lines[which].append([str(pid), name, cls, str(rng.choice(COVIDX_SOURCES))])
                i += 1
            pid += 1

    def finish(results: list[dict]) -> None:
        drawn = iter(r["drawn"] for r in results)  # plans are in list order: train, then test
        text = {}
        for which, rows in lines.items():
            for row in rows:
                if not next(drawn):
                    row[2] = "normal"  # nothing visible was drawn
            text[which] = "".join(" ".join(r) + "\n" for r in rows)
        for which, body in text.items():
            atomic_write_bytes(root / f"{which}_COVIDx9A.txt", body.encode())

    return plans, finish


def _annotate(region) -> str:
    """Native Object-CXR annotation of one drawn object: "T x1 y1 x2 y2" (rectangle, ellipse: the
    renderer's corner points) or "2 x1 y1 x2 y2 x3 y3 ..." (polygon vertices)."""
    coords = [v for point in region.points for v in point]
    return f"{OBJECT_CXR_CODES[region.shape]} " + " ".join(str(int(v)) for v in coords)


def _plan_object_cxr(root: Path, n: int, rng: np.random.Generator) -> tuple[list[dict], Callable]:
    plans = []
    for which, count, first in (("train", n, 1), ("dev", max(5, n // 4), 8001)):
        for i in range(count):
            shapes = (
                [str(t) for t in rng.choice(OBJECT_SHAPES, size=int(rng.integers(1, 4)))] if rng.random() < 0.5 else []
            )
            width = int(rng.integers(400, 640))
            plans.append(
                {
                    "which": which,
                    "rel": f"{which}/{first + i:05d}.jpg",
                    "shapes": shapes,
                    "width": width,
                    "height": int(width * rng.uniform(0.9, 1.2)),
                }
            )

    def finish(results: list[dict]) -> None:
        for which in ("train", "dev"):
            rows = [[p["rel"].split("/")[1], r["annotation"]] for p, r in zip(plans, results) if p["which"] == which]
            _write_csv(root / f"{which}.csv", ["image_name", "annotation"], rows)

    return plans, finish


CXR14_LABELS = tuple(CXR14_KINDS)  # the 14 names, in the official order
# The real header, quirks included: the bracketed names contain commas, and lines end with a comma.
CXR14_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
    "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)


def _plan_chestxray14(root: Path, n: int, rng: np.random.Generator) -> tuple[list[dict], Callable]:
    plans, lines, lists = [], [], {"train_val": [], "test": []}
    patient = 1
    while len(plans) < n:
        which = "test" if rng.random() < 0.25 else "train_val"
        sex, age = str(rng.choice(["M", "F"])), int(rng.integers(10, 90))
        for follow_up in range(min(int(rng.integers(1, 4)), n - len(plans))):
            findings = (
                []
                if rng.random() < 0.45
                else sorted(
                    rng.choice(CXR14_LABELS, size=int(rng.integers(1, 4)), replace=False).tolist(),
                    key=CXR14_LABELS.index,
                )
            )
            name = f"{patient:08d}_{follow_up:03d}.png"
            plans.append({"rel": f"images_001/images/{name}", "findings": findings})
            lines.append((name, f"{follow_up},{patient},{age},{sex},{rng.choice(['PA', 'AP'])},2500,2048,0.143,0.143,"))
            lists[which].append(name)
        patient += 1

    def finish(results: list[dict]) -> None:
        # Finding Labels: what was drawn (official label order), "No Finding" when nothing was.
        text = (
            CXR14_HEADER
            + "\n"
            + "".join(
                f"{name},{'|'.join(r['drawn']) or 'No Finding'},{rest}\n" for (name, rest), r in zip(lines, results)
            )
        )
        atomic_write_bytes(root / "Data_Entry_2017.csv", text.encode())
        for which, names in lists.items():
            atomic_write_bytes(root / f"{which}_list.txt", "".join(x + "\n" for x in names).encode())

    return plans, finish


def _plan_rsna(root: Path, n: int, rng: np.random.Generator) -> tuple[list[dict], Callable]:
    def finish(results: list[dict]) -> None:
        _write_csv(
            root / "stage_2_train_labels.csv",
            ["patientId", "x", "y", "width", "height", "Target"],
            [row for r in results for row in r["rows"]],
        )

    return [{} for _ in range(n)], finish


def _plan_siim(root: Path, n: int, rng: np.random.Generator) -> tuple[list[dict], Callable]:
    def finish(results: list[dict]) -> None:
        # The real header has a space after the comma, and every value keeps its leading space.
        text = "ImageId, EncodedPixels\n" + "".join(f"{a},{b}\n" for r in results for a, b in r["rows"])
        atomic_write_bytes(root / "train-rle.csv", text.encode())

    return [{} for _ in range(n)], finish


_PLANS = {
    "rsna_pneumonia": _plan_rsna,
    "siim_pneumothorax": _plan_siim,
    "chexpert": _plan_chexpert,
    "covidx": _plan_covidx,
    "object_cxr": _plan_object_cxr,
    "chestxray14": _plan_chestxray14,
}


def write_all(
    out: str | Path, n: int, seed: int, workers: int = 1, datasets: tuple[str, ...] = DATASETS
) -> dict[str, int]:
    """Write `<out>/<dataset>/` for each dataset (about `n` images each); returns images per dataset."""
    out = Path(out)
    jobs, finishers = [], []
    for name in datasets:
        root = out / name
        plans, finish = _PLANS[name](root, n, _plan_rng(seed, name))
        start = len(jobs)
        jobs.extend(_Job(name, str(root), i, seed, plan) for i, plan in enumerate(plans))
        finishers.append((name, start, len(jobs), finish))
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_run, jobs, chunksize=8))
    else:
        results = [_run(job) for job in jobs]
    counts = {}
    for name, start, end, finish in finishers:
        finish(results[start:end])
        counts[name] = end - start
    return counts
