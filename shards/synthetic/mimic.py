"""A synthetic MIMIC-CXR-JPG 2.0.0 corpus: the project's embedded default pretraining dataset.

    generate_mimic(out, n, seed, size=1024, workers=1, overwrite=False) -> summary dict

writes, exactly in the MIMIC-CXR-JPG layout (reports copied next to the study folders, as MGCA expects):

    <out>/files/p<XX>/p<subject>/s<study>/<dicom_id>.jpg    8-bit gray JPEG (quality 95), 1-3 per study
    <out>/files/p<XX>/p<subject>/s<study>.txt               the report (reports.write_report)
    <out>/mimic-cxr-2.0.0-metadata.csv                      12 columns, METADATA_HEADER
    <out>/mimic-cxr-2.0.0-split.csv                         dicom_id, study_id, subject_id, split
    <out>/mimic-cxr-2.0.0-chexpert.csv                      subject_id, study_id + CHEXPERT_LABELS
and, outside the MIMIC layout:
    <out>/synthetic_regions.jsonl   one line per image (metadata order): {"dicom_id", "subject_id",
        "study_id", "view", "width", "height", "regions": [{"finding", "side", "zone", "box", "mask_rle"
        [, "shape"]}]}; box [x1, y1, x2, y2] in image pixels (x2/y2 exclusive), mask_rle as
        render.encode_mask_rle (decode with render.decode_mask_rle). Lateral views carry only what a
        lateral view shows (render.LATERAL_KINDS).
    <out>/synthetic_corpus.json     parameters + counts; a rerun with the same parameters is a no-op.

Ids: subject ids 8 digits from 10000000..19999999 (XX = first two digits), study ids 8 digits starting
with 5, dicom ids five dash-joined 8-hex-digit groups. Subjects have 1-5 studies; splits are drawn per
subject (train/validate/test ~ 90/5/5), and with n >= 20 every split holds at least one study.
Views per study: PA+LATERAL (most), PA+LL, a single portable AP, AP+LATERAL, and a few with a third image
whose ViewPosition is blank or another value (LAO, AP AXIAL, ...); every study has a PA or AP image.
About 30% of studies are normal (nothing drawn, No Finding 1.0); the rest have 1-3 findings, ~15% of
the hedgeable ones reported as uncertain (label -1.0, drawn a little fainter).

Determinism: the plan (subjects, ids, splits, dates) comes from SeedSequence(seed, spawn_key=(0,)) and
study i from SeedSequence(seed, spawn_key=(1, i)); rows are written in study order, JPEGs by Pillow at a
fixed quality, nothing carries a timestamp, so the tree is byte-identical for any worker count. The tree
is built in a temp folder next to `out` and renamed into place only when complete.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from common.cli import UserError
from shards.master import CHEXPERT_CSV, METADATA_CSV, SPLIT_CSV
from shards.schema import CHEXPERT_LABELS
from shards.synthetic.render import KIND_LOCATIONS, FindingSpec, encode_mask_rle, render_radiograph
from shards.synthetic.reports import Mention, write_report

FORMAT = "synthetic-mimic-cxr-jpg/1"
REGIONS_NAME = "synthetic_regions.jsonl"
CORPUS_NAME = "synthetic_corpus.json"
JPEG_QUALITY = 95
MAX_SIZE = 3000
METADATA_HEADER = (
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
SPLIT_HEADER = ("dicom_id", "study_id", "subject_id", "split")
CHEXPERT_HEADER = ("subject_id", "study_id") + CHEXPERT_LABELS
SPLIT_P = {"train": 0.90, "validate": 0.05, "test": 0.05}

P_NORMAL = 0.30
# Relative frequency of each drawn kind among abnormal studies (portable AP studies: more devices).
KIND_WEIGHTS = {
    "effusion": 0.14,
    "atelectasis": 0.12,
    "cardiomegaly": 0.11,
    "opacity": 0.10,
    "pneumonia": 0.09,
    "support_device": 0.09,
    "consolidation": 0.07,
    "edema": 0.07,
    "pneumothorax": 0.07,
    "nodule": 0.05,
    "mass": 0.03,
    "enlarged_cardiomediastinum": 0.03,
    "fracture": 0.02,
    "pleural_thickening": 0.02,
}
UNCERTAIN_KINDS = (
    "opacity",
    "consolidation",
    "pneumonia",
    "atelectasis",
    "effusion",
    "pneumothorax",
    "edema",
    "cardiomegaly",
    "nodule",
)
P_UNCERTAIN = 0.15
# (ViewPosition values, probability); blank/other ones are drawn as the view in RENDER_AS.
VIEW_SETS = (
    (("PA", "LATERAL"), 0.50),
    (("AP",), 0.26),
    (("PA", "LL"), 0.08),
    (("AP", "LATERAL"), 0.06),
    (("PA", "LATERAL", ""), 0.04),
    (("PA", "LATERAL", "PA"), 0.03),
    (("AP", ""), 0.01),
    (("PA", "LL", "LAO"), 0.01),
    (("AP", "AP AXIAL"), 0.01),
)
RENDER_AS = {"PA": "PA", "AP": "AP", "LATERAL": "LATERAL", "LL": "LL", "": "LATERAL", "LAO": "PA", "AP AXIAL": "AP"}
VIEW_MEANING = {
    "PA": "postero-anterior",
    "AP": "antero-posterior",
    "LATERAL": "lateral",
    "LL": "left lateral",
    "": "",
    "LAO": "left anterior oblique",
    "AP AXIAL": "antero-posterior",
}


@dataclass(frozen=True)
class StudyPlan:
    index: int
    subject_id: str
    study_id: str
    split: str
    study_date: str  # YYYYMMDD (MIMIC's shifted years, 2110-2190)
    study_time: str  # HHMMSS.fff


@dataclass
class StudyResult:
    metadata: list[list[str]]
    split_rows: list[list[str]]
    chexpert: list[str]
    region_lines: list[str]
    kinds: list[str]  # drawn kinds (one entry per mention)
    regions: Counter = field(default_factory=Counter)  # region count per finding
    uncertain: int = 0
    style: str = ""


def _plan_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))


def _study_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, index)))


def _unique_ints(rng, low: int, high: int, n: int) -> list[int]:
    seen: set[int] = set()
    out = []
    while len(out) < n:
        for v in rng.integers(low, high, size=n - len(out)).tolist():
            if v not in seen:
                seen.add(v)
                out.append(v)
    return out


def _assign_splits(rng, sizes: list[int], n: int) -> list[str]:
    names = list(SPLIT_P)
    splits = [names[int(i)] for i in rng.choice(len(names), size=len(sizes), p=list(SPLIT_P.values()))]
    if n >= 20:
        # Every split gets a subject: take the smallest subject of the split with the most subjects.
        for want in names:
            if want in splits:
                continue
            donor = max(names, key=lambda s: (splits.count(s), -names.index(s)))
            pick = min((i for i, s in enumerate(splits) if s == donor), key=lambda i: (sizes[i], -i))
            splits[pick] = want
    return splits


def plan_studies(n: int, seed: int) -> list[StudyPlan]:
    """Subjects, ids, splits and dates for `n` studies (grouped by subject, subjects in id order)."""
    rng = _plan_rng(seed)
    sizes = []
    while sum(sizes) < n:
        sizes.append(min(int(rng.choice([1, 2, 3, 4, 5], p=[0.55, 0.2, 0.12, 0.08, 0.05])), n - sum(sizes)))
    subjects = sorted(_unique_ints(rng, 10_000_000, 20_000_000, len(sizes)))
    studies = _unique_ints(rng, 50_000_000, 60_000_000, n)
    splits = _assign_splits(rng, sizes, n)
    plans = []
    for subject, count, split in zip(subjects, sizes, splits):
        day = datetime.date(int(rng.integers(2110, 2190)), 1, 1) + datetime.timedelta(days=int(rng.integers(0, 365)))
        for _ in range(count):
            t = int(rng.integers(0, 86_400_000))
            hhmmss = f"{t // 3_600_000:02d}{t // 60_000 % 60:02d}{t // 1000 % 60:02d}.{t % 1000:03d}"
            plans.append(
                StudyPlan(len(plans), str(subject), str(studies[len(plans)]), split, day.strftime("%Y%m%d"), hhmmss)
            )
            day += datetime.timedelta(days=int(rng.integers(1, 400)))
    return plans


def _sample_mentions(rng, portable: bool) -> list[Mention]:
    if rng.random() < P_NORMAL:
        return []
    kinds = list(KIND_WEIGHTS)
    weights = np.array(
        [
            KIND_WEIGHTS[k]
            * (3.0 if portable and k == "support_device" else 1.5 if portable and k in ("edema", "effusion") else 1.0)
            for k in kinds
        ]
    )
    count = int(rng.choice([1, 2, 3], p=[0.55, 0.3, 0.15]))
    chosen = [kinds[int(i)] for i in rng.choice(len(kinds), size=count, replace=False, p=weights / weights.sum())]
    mentions = []
    for kind in chosen:
        sides, zones = KIND_LOCATIONS[kind]
        side = str(rng.choice(sides))
        if kind == "effusion":
            side = str(rng.choice(["right", "left", "bilateral"], p=[0.38, 0.37, 0.25]))
        zone = str(rng.choice(zones))
        uncertain = kind in UNCERTAIN_KINDS and rng.random() < P_UNCERTAIN
        severity = float(rng.uniform(0.35, 0.55) if uncertain else rng.uniform(0.45, 1.0))
        if kind == "support_device":
            shapes, p = (
                (["ett", "ng_tube", "central_line", "pacemaker"], [0.35, 0.25, 0.25, 0.15])
                if portable
                else (["central_line", "pacemaker"], [0.4, 0.6])
            )
            picked = rng.choice(shapes, size=1 + int(portable and rng.random() < 0.35), replace=False, p=p)
            for shape in picked:
                dev_side = "none" if shape in ("ett", "ng_tube") else str(rng.choice(["right", "left"], p=[0.4, 0.6]))
                mentions.append(Mention(FindingSpec(kind, dev_side, "none", severity, str(shape))))
            continue
        mentions.append(Mention(FindingSpec(kind, side, zone, severity), uncertain))
    return mentions


def _image_size(rng, size: int, view: str) -> tuple[int, int]:
    """(width, height): longer side 90-100% of `size`, never square; portable APs often landscape."""
    longer = int(round(size * rng.uniform(0.9, 1.0)))
    shorter = int(round(longer / rng.uniform(1.08, 1.3)))
    landscape = RENDER_AS[view] == "AP" and rng.random() < 0.35
    return (longer, shorter) if landscape else (shorter, longer)


def _dicom_id(rng) -> str:
    raw = rng.bytes(20).hex()
    return "-".join(raw[i : i + 8] for i in range(0, 40, 8))


def _fmt_label(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def study_dir(subject_id: str, study_id: str) -> str:
    """Relative folder of a study: files/p<XX>/p<subject>/s<study>."""
    return f"files/p{subject_id[:2]}/p{subject_id}/s{study_id}"


def render_study(plan: StudyPlan, seed: int, size: int, root: str) -> StudyResult:
    """Draw one study, write its JPEGs and report under `root`, return its csv/jsonl rows."""
    rng = _study_rng(seed, plan.index)
    views = list(VIEW_SETS[int(rng.choice(len(VIEW_SETS), p=[p for _, p in VIEW_SETS]))][0])
    portable = views[0] == "AP"
    mentions = _sample_mentions(rng, portable)
    report = write_report(rng, mentions, views)
    folder = Path(root) / study_dir(plan.subject_id, plan.study_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder.parent / f"s{plan.study_id}.txt").write_text(report.text, encoding="utf-8")

    exam = "CHEST (PORTABLE AP)" if portable else "CHEST (PA AND LAT)"
    orientation = (
        ("Recumbent" if rng.random() < 0.7 else "Erect") if portable else ("Erect" if rng.random() < 0.97 else "")
    )
    result = StudyResult(
        metadata=[],
        split_rows=[],
        region_lines=[],
        chexpert=[plan.subject_id, plan.study_id] + [_fmt_label(report.labels[k]) for k in CHEXPERT_LABELS],
        kinds=[m.spec.kind for m in mentions],
        uncertain=sum(m.uncertain for m in mentions),
        style=report.style,
    )
    for view in views:
        dicom_id = _dicom_id(rng)
        width, height = _image_size(rng, size, view)
        image_rng = np.random.default_rng(rng.integers(0, 2**63 - 1))
        rendered = render_radiograph(image_rng, [m.spec for m in mentions], width, height, RENDER_AS[view])
        buf = io.BytesIO()
        Image.fromarray(rendered.image).save(buf, format="JPEG", quality=JPEG_QUALITY)
        (folder / f"{dicom_id}.jpg").write_bytes(buf.getvalue())
        result.metadata.append(
            [
                dicom_id,
                plan.subject_id,
                plan.study_id,
                exam,
                view,
                str(height),
                str(width),
                plan.study_date,
                plan.study_time,
                exam,
                VIEW_MEANING[view],
                orientation,
            ]
        )
        result.split_rows.append([dicom_id, plan.study_id, plan.subject_id, plan.split])
        regions = []
        for region in rendered.regions:
            entry = {
                "finding": region.finding,
                "side": region.side,
                "zone": region.zone,
                "box": region.box,
                "mask_rle": encode_mask_rle(region.mask),
            }
            if region.shape is not None:
                entry["shape"] = region.shape
            regions.append(entry)
            result.regions[region.finding] += 1
        result.region_lines.append(
            json.dumps(
                {
                    "dicom_id": dicom_id,
                    "subject_id": plan.subject_id,
                    "study_id": plan.study_id,
                    "view": view,
                    "width": width,
                    "height": height,
                    "regions": regions,
                },
                separators=(",", ":"),
            )
        )
    return result


def _study_job(args: tuple) -> StudyResult:
    return render_study(*args)


def _write_csv(path: Path, header: tuple[str, ...], rows: list[list[str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _params(n: int, seed: int, size: int) -> dict:
    return {"format": FORMAT, "n_studies": n, "seed": seed, "size": size}


class SynthParamError(UserError, ValueError):
    """Bad generator arguments or a damaged existing corpus: one `error:` line from the entry point."""


def _remove_dead_temp_trees(out: Path) -> None:
    """Delete `.<name>.tmp-<pid>` / `.old-<pid>` trees next to `out` whose writer process is gone
    (a killed generator leaves them; a live one's are kept)."""
    for tree in out.parent.glob(f".{out.name}.*-*") if out.parent.is_dir() else ():
        kind, _, pid = tree.name[len(out.name) + 2 :].rpartition("-")
        if kind not in ("tmp", "old") or not pid.isdigit() or not tree.is_dir() or tree.is_symlink():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # its writer is still running
        except ProcessLookupError:
            shutil.rmtree(tree, ignore_errors=True)
        except PermissionError:
            continue  # another user's live process


def generate_mimic(
    out: str | Path, n: int, seed: int = 0, size: int = 1024, workers: int = 1, overwrite: bool = False
) -> dict:
    """Write the corpus (module docstring) and return its summary; "seconds" is added, not stored.

    If `out` already holds a corpus made with the same (n, seed, size), nothing is redone. Any other
    non-empty `out` is an error unless `overwrite` is set and `out` is itself a synthetic corpus."""
    out = Path(out)
    if n < 1:
        raise SynthParamError(f"synthetic MIMIC: n must be >= 1 studies, got {n}")
    if not 64 <= size <= MAX_SIZE:
        raise SynthParamError(f"synthetic MIMIC: size {size} outside 64..{MAX_SIZE}")
    if workers < 1:
        raise SynthParamError(f"synthetic MIMIC: workers must be >= 1, got {workers}")
    marker = out / CORPUS_NAME
    _remove_dead_temp_trees(out)
    if out.exists() and any(out.iterdir()):
        try:
            previous = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SynthParamError(f"{marker}: damaged corpus marker ({exc}); delete {out} to regenerate") from exc
        if (
            previous is not None
            and all(previous.get(k) == v for k, v in _params(n, seed, size).items())
            and not overwrite
        ):
            return {**previous, "seconds": 0.0, "reused": True}
        if previous is None:
            raise FileExistsError(
                f"{out} exists and is not a synthetic corpus ({CORPUS_NAME} missing); refusing to replace it"
            )
        if not overwrite:
            raise FileExistsError(
                f"{out} holds a synthetic corpus with other parameters "
                f"(n={previous.get('n_studies')}, seed={previous.get('seed')}, "
                f"size={previous.get('size')}); pass overwrite (--overwrite) to replace it"
            )

    start = time.perf_counter()
    plans = plan_studies(n, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "files").mkdir(parents=True)
    try:
        jobs = [(plan, seed, size, str(tmp)) for plan in plans]
        # A bar with an ETA (stderr; hidden when stderr is not a terminal): thousands of studies take minutes.
        bar = dict(total=len(jobs), unit="study", desc=f"rendering {out.name}", disable=None)
        if workers > 1:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                results = list(tqdm(pool.map(_study_job, jobs, chunksize=max(1, min(8, n // (4 * workers)))), **bar))
        else:
            results = [_study_job(job) for job in tqdm(jobs, **bar)]
        summary = _summarise(n, seed, size, plans, results)
        _write_csv(tmp / METADATA_CSV, METADATA_HEADER, [r for res in results for r in res.metadata])
        _write_csv(tmp / SPLIT_CSV, SPLIT_HEADER, [r for res in results for r in res.split_rows])
        _write_csv(tmp / CHEXPERT_CSV, CHEXPERT_HEADER, [res.chexpert for res in results])
        (tmp / REGIONS_NAME).write_text(
            "".join(line + "\n" for res in results for line in res.region_lines), encoding="utf-8"
        )
        (tmp / CORPUS_NAME).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**summary, "seconds": round(time.perf_counter() - start, 2), "reused": False}


def _summarise(n: int, seed: int, size: int, plans: list[StudyPlan], results: list[StudyResult]) -> dict:
    labels = {name: Counter() for name in CHEXPERT_LABELS}
    for res in results:
        for name, value in zip(CHEXPERT_LABELS, res.chexpert[2:]):
            labels[name][value or "blank"] += 1
    regions = Counter()
    for res in results:
        regions.update(res.regions)
    return {
        **_params(n, seed, size),
        "subjects": len({p.subject_id for p in plans}),
        "images": sum(len(res.metadata) for res in results),
        "views": dict(sorted(Counter(row[4] or "(blank)" for res in results for row in res.metadata).items())),
        "splits": {s: sum(p.split == s for p in plans) for s in SPLIT_P},
        "normal_studies": sum(not res.kinds for res in results),
        "uncertain_mentions": sum(res.uncertain for res in results),
        "studies_with": dict(sorted(Counter(k for res in results for k in set(res.kinds)).items())),
        "regions": dict(sorted(regions.items())),
        "report_styles": dict(sorted(Counter(res.style for res in results).items())),
        "labels": {name: dict(sorted(c.items())) for name, c in labels.items()},
    }
