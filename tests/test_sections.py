"""Report sectioning (MGCA / MIT-LCP rules) and training-text cleaning, on hand-written reports."""

import csv

from shards.sections import (
    clean_section,
    normalise_section_name,
    section_report,
    section_reports,
    training_text,
    write_sectioned_csv,
)

TYPICAL = (
    "                                 FINAL REPORT\n"
    " EXAMINATION:  CHEST (PA AND LAT)\n"
    " \n"
    " INDICATION:  ___F with cough\n"
    " \n"
    " COMPARISON:  ___\n"
    " \n"
    " FINDINGS: \n"
    " \n"
    " PA and lateral views of the chest provided.  There is no focal consolidation,\n"
    " effusion, or pneumothorax.\n"
    " \n"
    " IMPRESSION: \n"
    " \n"
    " No acute intrathoracic process.\n"
)


def test_typical_report_sections():
    sec = section_report(TYPICAL)
    assert sec["impression"] == "No acute intrathoracic process."
    assert sec["findings"].startswith("PA and lateral views of the chest provided.")
    assert sec["findings"].endswith("effusion, or pneumothorax.")
    assert sec["comparison"] == "___"
    assert sec["last_paragraph"] == ""


def test_header_regex_needs_newline_space_uppercase_colon_whitespace():
    # "Impression:" (not upper case), "IMPRESSION:" without the leading space, "IMPRESSION:x" with no
    # whitespace after the colon and a header at the very start (no newline) are not headers.
    text = "IMPRESSION: a\n Impression: b\nIMPRESSION: c\n IMPRESSION:d\n FINDINGS: real one\n"
    sec = section_report(text)
    assert sec["findings"] == "real one"
    assert sec["impression"] == ""
    # Header names may use space ( ) / , - .
    sec = section_report("\n FINDINGS (PA/LAT, UPRIGHT-ONLY): lungs clear\n")
    assert sec["findings"] == "lungs clear"


def test_name_normalisation_rules():
    assert normalise_section_name("CONCLUSION") == "impression"
    assert normalise_section_name("FINDINGS AND IMPRESSION") == "impression"
    assert normalise_section_name("FINDING") == "findings"
    assert normalise_section_name("IMPRESSON") == "impression"
    assert normalise_section_name("IMORESSION") == "impression"
    # "contains a main name" rule
    assert normalise_section_name("PRELIMINARY IMPRESSION") == "impression"
    assert normalise_section_name("CLINICAL HISTORY") == "history"
    assert normalise_section_name("OLD COMPARISON STUDIES") == "comparison"
    assert normalise_section_name("ADDENDUM 2") == "addendum"
    # view-like names -> findings
    assert normalise_section_name("CHEST") == "findings"
    assert normalise_section_name("PORTABLE AP UPRIGHT") == "findings"
    assert normalise_section_name("PA AND LATERAL") == "findings"
    assert normalise_section_name("REASON FOR EXAMINATION") == "indication"
    assert normalise_section_name("WHATEVER ELSE") == "whatever else"


def test_typo_and_conclusion_headers_become_impression():
    text = " FINAL REPORT\n INDICATION: x\n \n FINDING: Clear lungs.\n \n IMPRESSON: Normal.\n"
    sec = section_report(text)
    assert sec["findings"] == "Clear lungs."
    assert sec["impression"] == "Normal."
    sec = section_report("\n CONCLUSION: Stable.\n")
    assert sec["impression"] == "Stable."
    sec = section_report("\n PORTABLE CHEST: Tube in place.\n \n FINDINGS AND IMPRESSION: No change.\n")
    assert sec["findings"] == "Tube in place."
    assert sec["impression"] == "No change."


def test_last_section_of_a_name_wins():
    text = "\n IMPRESSION: first\n FINDINGS: f\n CONCLUSION: second\n"
    assert section_report(text)["impression"] == "second"


def test_empty_sections_removed_and_last_paragraph_fallback():
    # Both main sections empty -> removed; the last remaining section (indication) is split at its
    # first blank line and the rest becomes last_paragraph.
    text = "\n INDICATION: cough\n \n Heart size normal.\n \n Lungs clear.\n FINDINGS: \n IMPRESSION:  \n"
    sec = section_report(text)
    assert sec["impression"] == "" and sec["findings"] == ""
    assert sec["last_paragraph"] == "Heart size normal.\n \n Lungs clear."


def test_no_sections_at_all():
    text = "                 FINAL REPORT\n Chest radiograph.\n \n The lungs are clear.\n"
    sec = section_report(text)
    assert sec["last_paragraph"] == "The lungs are clear."
    assert sec["impression"] == sec["findings"] == sec["comparison"] == ""
    # No blank line: no last_paragraph either.
    assert section_report(" just one line")["last_paragraph"] == ""


def test_preamble_is_not_a_section_we_keep():
    text = " WET READ: ___ 10:00 PM\n FINAL REPORT\n IMPRESSION: Clear.\n"
    sec = section_report(text)
    assert sec["impression"] == "Clear."
    assert "WET READ" not in sec["impression"]


def test_header_directly_followed_by_header():
    sec = section_report("\n FINDINGS:\n IMPRESSION: Fine.\n")
    assert sec["impression"] == "Fine." and sec["findings"] == ""


def test_write_sectioned_csv_and_bad_reports(tmp_path):
    files = tmp_path / "files" / "p10" / "p10000032"
    files.mkdir(parents=True)
    (files / "s50414267.txt").write_text(TYPICAL, encoding="utf-8")
    (files / "s50000001.txt").write_bytes(b"")
    (files / "s50000002.txt").write_bytes(b"\n FINDINGS: caf\xe9 latin-1\n")
    (files / "s50000003.txt").write_text('\n CONCLUSION: Line one,\n still "quoted".\n', encoding="utf-8")
    (files / "notes.txt").write_text("not a report", encoding="utf-8")
    out = tmp_path / "mimic_cxr_sectioned.csv"
    sections, problems = write_sectioned_csv(tmp_path / "files", out)
    with out.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["study", "impression", "findings", "last_paragraph", "comparison"]
    assert [r["study"] for r in rows] == ["s50000003", "s50414267"]
    assert rows[0]["impression"] == 'Line one,\n still "quoted".'
    assert rows[1]["impression"] == "No acute intrathoracic process."
    reasons = {p["key"]: p["reason"] for p in problems}
    assert reasons["s50000001"].startswith("empty report")
    assert "not UTF-8" in reasons["s50000002"]
    assert all(p["source"].endswith(f"{p['key']}.txt") for p in problems)
    assert set(sections) == {"s50000003", "s50414267"}
    assert section_reports(tmp_path / "files")[0] == sections


def test_clean_section_rules():
    assert clean_section("FINDINGS: 1. No effusion. 2. No pneumothorax.") == "No effusion. No pneumothorax."
    assert clean_section("Nodule measures 3.5 cm.\n\n  Stable.") == "Nodule measures 3.5 cm. Stable."
    assert clean_section(" PA AND LATERAL:\n Lungs clear..") == "Lungs clear."
    assert clean_section("COMPARISON: ___ Heart normal") == "___ Heart normal."
    assert clean_section("Is there effusion?") == "Is there effusion?"
    assert clean_section("  \n ") == ""


def test_training_text_is_impression_then_findings():
    assert training_text("No acute process.", "Lungs are clear.") == "No acute process. Lungs are clear."
    assert training_text("", "Lungs are clear") == "Lungs are clear."
    assert training_text("1.", " ") == ""  # only list numbers: no usable text
    assert training_text("___", "") == ""  # only de-identification marks
