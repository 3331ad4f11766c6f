"""MIMIC-CXR report sectioning and the training-text cleaning built on it.

Sectioning re-implements the rules MGCA uses (its port of MIT-LCP `create_section_files.py`),
from the facts in /work/shared/reference/datasets.md section 1:
- a header is: newline, one space, an upper-case name of [A-Z ()/,-], a colon, whitespace;
- text before the first header is the "preamble"; a section runs to the next header;
- names are lower-cased and normalised (dictionary + typo map, then "contains a main name",
  then view-like names -> findings);
- empty impression/findings sections are removed; if neither is left, the last section is split at
  its first blank line and the remainder becomes `last_paragraph`;
- each output field is the LAST section of that name, stripped ("" when absent).
One deliberate difference: the header's trailing whitespace is not consumed, so a header directly
followed by another header on the next line (` FINDINGS:\n IMPRESSION: ...`) gives two sections
instead of swallowing the second header into the first section's text.

`training_text(impression, findings)` is the text stored in each shard's `.txt` member: G2D's
concatenation (impression first, then findings), cleaned. See its docstring for the exact rules.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from common.io import atomic_open
from shards.paths import outside_root

SECTIONED_COLUMNS = ("study", "impression", "findings", "last_paragraph", "comparison")

HEADER_RE = re.compile(r"\n ([A-Z ()/,-]+):(?=\s)")
BLANK_LINE_RE = re.compile(r"\n[ \t]*\n")

# Exact (lower-cased, stripped) header names -> canonical section name. Covers the frequent MIMIC
# headers and the typos seen in the corpus; anything else falls through to the pattern rules below.
SECTION_NAMES = {
    "preamble": "preamble",
    "impression": "impression",
    "impressions": "impression",
    "conclusion": "impression",
    "conclusions": "impression",
    "findings and impression": "impression",
    "findings/impression": "impression",
    "findings/ impression": "impression",
    "impression and findings": "impression",
    "findings": "findings",
    "finding": "findings",
    "reference findings": "findings",
    "chest, two views": "findings",
    "comparison": "comparison",
    "comparisons": "comparison",
    "comparison exam": "comparison",
    "comparison film": "comparison",
    "reference exam": "comparison",
    "indication": "indication",
    "clinical indication": "indication",
    "reason for examination": "indication",
    "reason for exam": "indication",
    "history": "history",
    "clinical history": "history",
    "clinical information": "history",
    "patient history": "history",
    "examination": "examination",
    "exam": "examination",
    "type of examination": "examination",
    "technique": "technique",
    "notification": "notification",
    "recommendation": "recommendations",
    "recommendations": "recommendations",
    "recommendation(s)": "recommendations",
    "addendum": "addendum",
    "wet read": "wet read",
    "wetread": "wet read",
    "comment": "comment",
    "date": "date",
}
# Misspellings found in MIMIC report headers.
TYPOS = {
    "impresson": "impression",
    "imoression": "impression",
    "imprression": "impression",
    "impressoin": "impression",
    "imprssion": "impression",
    "impresion": "impression",
    "imperssion": "impression",
    "mpression": "impression",
    "impession": "impression",
    "findins": "findings",
    "findindgs": "findings",
    "findgings": "findings",
    "findngs": "findings",
    "findnings": "findings",
    "finidngs": "findings",
    "idication": "indication",
    "comparision": "comparison",
    "comparsion": "comparison",
    "comparrison": "comparison",
    "comparisions": "comparison",
}
MAIN_SECTIONS = ("impression", "findings", "history", "comparison", "addendum")
# Header names that describe the views taken: their text is the findings.
VIEW_NAME_RE = re.compile(
    r"chest|portable|pa and lat|lateral and pa|ap and lateral|lateral and ap|frontal and|two views|"
    r"frontal view|pa view|ap view|one view|lateral view|bone window|frontal upright|"
    r"frontal semi-upright|ribs"
)


def normalise_section_name(raw: str) -> str:
    """Header text (any case) -> canonical section name; unknown names are returned lower-cased."""
    name = raw.strip().lower()
    if name in SECTION_NAMES:
        return SECTION_NAMES[name]
    if name in TYPOS:
        return TYPOS[name]
    for main in MAIN_SECTIONS:
        if main in name:
            return main
    if VIEW_NAME_RE.search(name):
        return "findings"
    return name


def split_sections(text: str) -> list[tuple[str, str]]:
    """[(canonical name, raw text)] in report order, after the empty-section and last-paragraph rules."""
    headers = list(HEADER_RE.finditer(text))
    if not headers:
        sections = [("full report", text)]
    else:
        sections = [("preamble", text[: headers[0].start()])]
        for i, match in enumerate(headers):
            end = headers[i + 1].start() if i + 1 < len(headers) else len(text)
            sections.append((normalise_section_name(match.group(1)), text[match.end() : end]))
    sections = [
        (name, body) for name, body in sections if not (name in ("impression", "findings") and not body.strip())
    ]
    names = {name for name, _ in sections}
    if "impression" not in names and "findings" not in names:
        name, body = sections[-1]
        parts = BLANK_LINE_RE.split(body, maxsplit=1)
        if len(parts) == 2:
            sections[-1] = (name, parts[0])
            sections.append(("last_paragraph", parts[1]))
    return sections


def section_report(text: str) -> dict[str, str]:
    """Report text -> {impression, findings, last_paragraph, comparison}: the last section of each
    name, stripped; "" where the report has none."""
    out = {name: "" for name in SECTIONED_COLUMNS[1:]}
    for name, body in split_sections(text):
        if name in out:
            out[name] = body.strip()
    return out


# A MIMIC report is 1-3 KB (the longest few ~15 KB); a 10.8 MB "report" was once packed and cost
# 13 s of tokenisation every epoch. Larger files are rejected unread (`--max-report-bytes`).
DEFAULT_MAX_REPORT_BYTES = 64 * 1024


def read_report(
    path: Path, root: Path | None = None, max_bytes: int = DEFAULT_MAX_REPORT_BYTES
) -> tuple[str | None, str]:
    """(text, "") for a usable report, (None, reason) for an empty, non-UTF-8 or too large one, or
    (with `root`) one whose symlinks lead outside `root`."""
    if root is not None:
        outside = outside_root(path, root)
        if outside:
            return None, outside
    try:
        size = path.stat().st_size
        if size > max_bytes:
            return None, f"report too large: {size} bytes > max_report_bytes {max_bytes}"
        data = path.read_bytes()
    except OSError as exc:
        return None, f"report unreadable: {exc.strerror or type(exc).__name__}"
    if not data.strip():
        return None, "empty report" if data else "empty report (0 bytes)"
    try:
        return data.decode("utf-8"), ""
    except UnicodeDecodeError as exc:
        return None, f"report is not UTF-8 ({exc.reason} at byte {exc.start})"


def report_files(reports_root: str | Path) -> list[Path]:
    """Every study report `s<digits>.txt` under `reports_root` (a `files/` tree or a copy of it),
    sorted by study name then path so the order is the same on any file system."""
    root = Path(reports_root)
    if not root.is_dir():
        raise FileNotFoundError(f"reports directory not found: {root}")
    found = [p for p in root.rglob("s*.txt") if p.is_file() and p.stem[1:].isdigit()]
    return sorted(found, key=lambda p: (p.stem, str(p)))


def section_reports(
    reports_root: str | Path, max_report_bytes: int = DEFAULT_MAX_REPORT_BYTES
) -> tuple[dict[str, dict[str, str]], list[dict]]:
    """Section every report under `reports_root`.

    Returns (sections by study "s<digits>", problems) where each problem is
    {"key": study, "source": path, "reason": ...} for an empty, non-UTF-8, too large, duplicated or
    outside-the-root (symlinked) report; such studies are absent from the first dict.
    """
    sections: dict[str, dict[str, str]] = {}
    problems: list[dict] = []
    for path in report_files(reports_root):
        study = path.stem
        if study in sections:
            problems.append(
                {"key": study, "source": str(path), "reason": "duplicate report for this study (first one kept)"}
            )
            continue
        text, reason = read_report(path, Path(reports_root), max_report_bytes)
        if text is None:
            problems.append({"key": study, "source": str(path), "reason": reason})
            continue
        sections[study] = section_report(text)
    return sections, problems


def write_sectioned_csv(
    reports_root: str | Path, out_csv: str | Path, max_report_bytes: int = DEFAULT_MAX_REPORT_BYTES
) -> tuple[dict[str, dict[str, str]], list[dict]]:
    """Write `mimic_cxr_sectioned.csv` (columns `SECTIONED_COLUMNS`, one row per usable report,
    sorted by study) atomically. Returns what `section_reports` returns."""
    sections, problems = section_reports(reports_root, max_report_bytes)
    with atomic_open(out_csv, "w") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(SECTIONED_COLUMNS)
        for study, sec in sections.items():
            writer.writerow([study] + [sec[c] for c in SECTIONED_COLUMNS[1:]])
    return sections, problems


# ----------------------------------------------------------------------------------------------
# Training text

# An upper-case header at the start of a line inside a section ("FINDINGS:", "PA AND LATERAL:"),
# and the words G2D strips anywhere (with their colon). Line-start only, so upper-case prose
# followed by a colon mid-sentence is kept; two or more capitals, so "L:"-style labels survive.
_LINE_HEADER_RE = re.compile(r"^[ \t]*[A-Z][A-Z ()/,-]*[A-Z)]:(?=\s|$)", re.MULTILINE)
_BARE_HEADER_RE = re.compile(r"\b(?:FINDINGS?|IMPRESSIONS?|COMPARISONS?)\b:?")
# A sentence ends at a period followed by whitespace or the end, so "3.5 cm" stays whole.
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)")
_LETTER_RE = re.compile(r"[A-Za-z]")


def clean_section(text: str) -> str:
    """One section -> cleaned text.

    1. upper-case headers at the start of a line ("FINDINGS:", "PA AND LATERAL:"...) and the
       words FINDINGS/IMPRESSION/COMPARISON anywhere are removed (G2D strips these substrings);
    2. all whitespace runs (newlines included) become one space;
    3. the text is split into sentences at periods followed by whitespace or the end (unlike G2D's
       split on every ".", this keeps decimals such as "3.5 cm" intact); fragments that are only
       digits (list numbers such as "1." "2.") and empty fragments ("..") are dropped;
    4. sentences are re-joined with single spaces, each ending in a period unless it already ends
       in other punctuation.
    """
    text = _BARE_HEADER_RE.sub(" ", _LINE_HEADER_RE.sub(" ", text))
    text = " ".join(text.split())
    sentences = []
    for piece in _SENTENCE_END_RE.split(text):
        piece = piece.strip()
        if not piece or piece.isdigit():
            continue
        sentences.append(piece if piece[-1] in ".?!:;" else piece + ".")
    return " ".join(sentences)


def training_text(impression: str, findings: str) -> str:
    """The `.txt` member: cleaned impression, a space, cleaned findings (G2D puts impression first
    and concatenates with no separator, which glues "effusion.The"; a space avoids that).
    Returns "" when the result has no letter at all (e.g. only "___" de-identification marks or
    list numbers): such a row has no usable text and is dropped with a count (MGCA issue #42)."""
    text = " ".join(part for part in (clean_section(impression), clean_section(findings)) if part)
    return text if _LETTER_RE.search(text) else ""
