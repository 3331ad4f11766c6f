"""MGCA's `master.csv` for MIMIC-CXR-JPG, rebuilt with the stdlib csv module.

Steps (datasets.md section 1, "Master csv"), applied to the metadata rows in file order:
1. keep ViewPosition in {PA, AP} (frontal only);
2./4. left-join the sectioned reports on study_id, drop rows whose impression and findings are both
   empty (MGCA drops them twice, before and after the join: once is the same thing);
3./4. inner-join `mimic-cxr-2.0.0-split.csv` on (dicom_id, subject_id, study_id); `validate` and
   `test` both become `valid` (or `test` stays separate with `keep_test=True`);
5. `Path` = `<root folder name>/files/p<sid[:2]>/p<sid>/s<study>/<dicom>.jpg`;
6. columns `MASTER_COLUMNS` (subject without "p", study with "s", missing text written as " ").
Plus one rule MGCA lacks: rows whose training text (impression + findings, cleaned) is empty are
dropped too (MGCA issue #42: ~9k such rows crash its pretraining).
MGCA seeds numpy with 42, but none of these steps is random, so nothing here depends on a seed.

Every removed row is counted under the first rule that removes it (`FILTER_RULES`), so
    input rows == kept rows + sum(filtered counts).
Rows that are kept but cannot become samples (report empty or not UTF-8, duplicated dicom_id,
view other than PA/AP in an existing master.csv) carry a `reject` reason; the packer records them
as rejected samples instead of dropping them silently.
"""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from common.cli import UserError
from common.io import atomic_open
from shards.schema import CHEXPERT_LABELS, FRONTAL_VIEWS
from shards.sections import DEFAULT_MAX_REPORT_BYTES, section_reports, training_text, write_sectioned_csv

METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
CHEXPERT_CSV = "mimic-cxr-2.0.0-chexpert.csv"
METADATA_COLUMNS = ("dicom_id", "subject_id", "study_id", "ViewPosition")
MASTER_COLUMNS = ("Path", "dicom_id", "subject_id", "study_id", "ViewPosition", "impression", "findings", "split")
# In the order they are applied; a row is counted under the first rule that removes it.
FILTER_RULES = ("not_frontal", "no_report", "no_text", "not_in_split", "empty_after_cleaning")
SPLIT_MAP = {"train": "train", "validate": "valid", "valid": "valid", "test": "valid"}


class DataError(UserError, ValueError):
    """A source csv is unusable as a whole (missing column, bad value): the message names the file,
    line and column; entry points print it as one `error:` line (exit 2)."""


@dataclass
class MasterRow:
    Path: str  # MGCA's relative path, see `image_path`
    dicom_id: str
    subject_id: str  # digits, no "p"
    study_id: str  # "s" + digits (MGCA's form)
    ViewPosition: str
    impression: str  # raw sectioned text, stripped ("" when absent)
    findings: str
    split: str  # train | valid | test
    text: str = ""  # training_text(impression, findings)
    reject: str = ""  # why this row cannot be packed ("" = fine)
    reject_source: str = ""  # the file that reason is about

    def csv_row(self) -> list[str]:
        return [
            self.Path,
            self.dicom_id,
            self.subject_id,
            self.study_id,
            self.ViewPosition,
            self.impression or " ",
            self.findings or " ",
            self.split,
        ]


@dataclass
class MasterResult:
    rows: list[MasterRow]
    input_rows: int
    filtered: dict[str, int]
    report_problems: list[dict] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# csv helpers


def find_csv(root: Path, name: str) -> Path:
    """`root/name`, or the `.gz` PhysioNet ships; error naming both when neither exists."""
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"missing {name} (or {name}.gz) in {root}")


def _open_text(path: Path) -> io.TextIOWrapper:
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


# What reading a damaged csv raises: not UTF-8, a NUL byte or bad quoting, a damaged .gz.
_CSV_READ_ERRORS = (UnicodeDecodeError, csv.Error, EOFError, gzip.BadGzipFile, zlib.error)


def check_columns(path: Path, required: tuple[str, ...]) -> None:
    """Fail, naming the file and the columns, if the csv header lacks any of `required`."""
    try:
        with _open_text(path) as fh:
            header = next(csv.reader(fh), [])
    except _CSV_READ_ERRORS as exc:
        raise DataError(f"{path}: not a readable UTF-8 csv ({type(exc).__name__}: {exc})") from exc
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; has {header}")


def read_csv(path: Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, row) of a csv (plain or .gz) after checking its columns exist."""
    check_columns(path, required)
    with _open_text(path) as fh:
        reader = csv.DictReader(fh)
        try:
            for row in reader:
                short = [c for c in required if row.get(c) is None]
                if short:
                    raise DataError(
                        f"{path} line {reader.line_num}: row has no value for column(s) {short} (too few fields)"
                    )
                yield reader.line_num, row
        except _CSV_READ_ERRORS as exc:
            raise DataError(
                f"{path} line {reader.line_num}: not a readable UTF-8 csv ({type(exc).__name__}: {exc})"
            ) from exc


def _digits(value: str, prefix: str, column: str, path: Path, line: int) -> str:
    """'p10000032' / '10000032' / '10000032.0' -> '10000032'; anything else is an error."""
    text = value.strip()
    if text.startswith(prefix):
        text = text[len(prefix) :]
    if text.endswith(".0"):
        text = text[:-2]
    if not text.isdigit():
        raise DataError(f"{path} line {line}: {column} {value!r} is not a number")
    return text


def mimic_path(root_name: str, subject: str, study: str, dicom_id: str) -> str:
    """MGCA's `Path` column (study without "s" here)."""
    return f"{root_name}/files/p{subject[:2]}/p{subject}/s{study}/{dicom_id}.jpg"


def image_path(root: Path, rel: str) -> Path:
    """Where a `Path` value lives under the MIMIC-CXR-JPG `root`: everything from its `files/`
    component on is taken relative to `root` (MGCA prefixes the root folder's own name)."""
    parts = PurePosixPath(rel.replace("\\", "/")).parts
    if "files" in parts:
        return root.joinpath(*parts[parts.index("files") :])
    return root / rel


# ----------------------------------------------------------------------------------------------
# inputs


def read_split_csv(path: Path, keep_test: bool) -> dict[tuple[str, str, str], str]:
    """(dicom_id, subject digits, study digits) -> mapped split."""
    out: dict[tuple[str, str, str], str] = {}
    for line, row in read_csv(path, ("dicom_id", "subject_id", "study_id", "split")):
        raw = row["split"].strip()
        if raw not in SPLIT_MAP:
            raise DataError(f"{path} line {line}: split {raw!r} is not one of {sorted(SPLIT_MAP)}")
        split = "test" if (keep_test and raw == "test") else SPLIT_MAP[raw]
        key = (
            row["dicom_id"].strip(),
            _digits(row["subject_id"], "p", "subject_id", path, line),
            _digits(row["study_id"], "s", "study_id", path, line),
        )
        if out.setdefault(key, split) != split:
            raise DataError(f"{path} line {line}: {key[0]} listed with two splits ({out[key]!r} and {split!r})")
    return out


def read_chexpert_labels(path: Path) -> dict[tuple[str, str], dict[str, float | None]]:
    """(subject digits, study digits) -> {label: 1.0 | 0.0 | -1.0 | None} for the 14 labels."""
    out: dict[tuple[str, str], dict[str, float | None]] = {}
    for line, row in read_csv(path, ("subject_id", "study_id") + CHEXPERT_LABELS):
        labels: dict[str, float | None] = {}
        for name in CHEXPERT_LABELS:
            raw = row[name].strip()
            if raw == "":
                labels[name] = None
                continue
            try:
                value = float(raw)
            except ValueError:
                value = float("nan")
            if value not in (1.0, 0.0, -1.0):
                raise DataError(f"{path} line {line}: {name} = {raw!r}, expected 1.0, 0.0, -1.0 or blank")
            labels[name] = value
        key = (
            _digits(row["subject_id"], "p", "subject_id", path, line),
            _digits(row["study_id"], "s", "study_id", path, line),
        )
        out[key] = labels
    return out


def check_root(root: str | Path) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"MIMIC-CXR-JPG root not found: {root}")
    return root


# ----------------------------------------------------------------------------------------------
# the two ways to get master rows


def _mark_duplicates(rows: list[MasterRow], source: str) -> None:
    """The second and later rows of a dicom_id are rejected (the first one is packed)."""
    first: dict[str, int] = {}
    for i, row in enumerate(rows):
        if row.dicom_id in first and not row.reject:
            row.reject = f"duplicate dicom_id (first seen in master row {first[row.dicom_id] + 1})"
            row.reject_source = source
        first.setdefault(row.dicom_id, i)


def build_master(
    root: str | Path,
    reports_dir: str | Path | None = None,
    keep_test: bool = False,
    sectioned_csv: str | Path | None = None,
    max_report_bytes: int = DEFAULT_MAX_REPORT_BYTES,
) -> MasterResult:
    """Master rows from a MIMIC-CXR-JPG root (metadata + split csvs) and its reports.

    Reports are read from `reports_dir` or, as MGCA expects, from `<root>/files`. With
    `sectioned_csv`, the sectioned reports are also written there (`mimic_cxr_sectioned.csv`).
    Missing inputs fail before any report is read.
    """
    root = check_root(root)
    metadata_path = find_csv(root, METADATA_CSV)
    split_path = find_csv(root, SPLIT_CSV)
    reports_root = Path(reports_dir) if reports_dir is not None else root / "files"
    if not reports_root.is_dir():
        raise FileNotFoundError(f"reports directory not found: {reports_root}")
    # Fail on a missing column before the (slow) report pass.
    check_columns(metadata_path, METADATA_COLUMNS)
    splits = read_split_csv(split_path, keep_test)
    if sectioned_csv is not None:
        sections, problems = write_sectioned_csv(reports_root, sectioned_csv, max_report_bytes)
    else:
        sections, problems = section_reports(reports_root, max_report_bytes)
    bad_reports = {p["key"]: p for p in problems if p["key"] not in sections}

    filtered = {rule: 0 for rule in FILTER_RULES}
    rows: list[MasterRow] = []
    input_rows = 0
    for line, rec in read_csv(metadata_path, METADATA_COLUMNS):
        input_rows += 1
        view = rec["ViewPosition"].strip()
        if view not in FRONTAL_VIEWS:
            filtered["not_frontal"] += 1
            continue
        dicom_id = rec["dicom_id"].strip()
        subject = _digits(rec["subject_id"], "p", "subject_id", metadata_path, line)
        study = _digits(rec["study_id"], "s", "study_id", metadata_path, line)
        sec = sections.get(f"s{study}")
        bad = bad_reports.get(f"s{study}")
        if sec is None and bad is None:
            filtered["no_report"] += 1
            continue
        impression = sec["impression"] if sec else ""
        findings = sec["findings"] if sec else ""
        if bad is None and not impression and not findings:
            filtered["no_text"] += 1
            continue
        split = splits.get((dicom_id, subject, study))
        if split is None:
            filtered["not_in_split"] += 1
            continue
        text = training_text(impression, findings)
        if bad is None and not text:
            filtered["empty_after_cleaning"] += 1
            continue
        row = MasterRow(
            mimic_path(root.name, subject, study, dicom_id),
            dicom_id,
            subject,
            f"s{study}",
            view,
            impression,
            findings,
            split,
            text,
        )
        if bad is not None:
            row.reject, row.reject_source = bad["reason"], bad["source"]
        rows.append(row)
    _mark_duplicates(rows, str(metadata_path))
    return MasterResult(rows, input_rows, filtered, problems)


def read_master_csv(path: str | Path, keep_test: bool = False) -> MasterResult:
    """Master rows from an existing MGCA `master.csv` (columns `MASTER_COLUMNS`).

    Its rows already passed MGCA's filters; the no-text and empty-after-cleaning rules are applied
    again (MGCA writes missing text as " "), `validate`/`test` are mapped like the split csv, and a
    view other than PA/AP is a rejected row (MGCA never writes one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"master csv not found: {path}")
    filtered = {rule: 0 for rule in FILTER_RULES}
    rows: list[MasterRow] = []
    input_rows = 0
    for line, rec in read_csv(path, MASTER_COLUMNS):
        input_rows += 1
        impression, findings = rec["impression"].strip(), rec["findings"].strip()
        if not impression and not findings:
            filtered["no_text"] += 1
            continue
        text = training_text(impression, findings)
        if not text:
            filtered["empty_after_cleaning"] += 1
            continue
        raw_split = rec["split"].strip()
        if raw_split not in SPLIT_MAP:
            raise DataError(f"{path} line {line}: split {raw_split!r} is not one of {sorted(SPLIT_MAP)}")
        split = "test" if (keep_test and raw_split == "test") else SPLIT_MAP[raw_split]
        subject = _digits(rec["subject_id"], "p", "subject_id", path, line)
        study = _digits(rec["study_id"], "s", "study_id", path, line)
        view = rec["ViewPosition"].strip()
        row = MasterRow(
            rec["Path"].strip(), rec["dicom_id"].strip(), subject, f"s{study}", view, impression, findings, split, text
        )
        if view not in FRONTAL_VIEWS:
            row.reject, row.reject_source = f"unknown view {view!r} (expected PA or AP)", str(path)
        rows.append(row)
    _mark_duplicates(rows, str(path))
    return MasterResult(rows, input_rows, filtered, [])


def write_master_csv(rows: list[MasterRow], path: str | Path) -> None:
    """MGCA's master.csv layout, atomically."""
    with atomic_open(path, "w") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(MASTER_COLUMNS)
        for row in rows:
            writer.writerow(row.csv_row())
