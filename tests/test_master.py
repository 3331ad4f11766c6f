"""master.csv rules (MGCA steps 1-7 + the empty-text rule) on a small hand-made csv set."""

import csv
import gzip

import pytest

from shards.master import (
    FILTER_RULES,
    MASTER_COLUMNS,
    build_master,
    image_path,
    read_chexpert_labels,
    read_master_csv,
    write_master_csv,
)
from shards.schema import CHEXPERT_LABELS

META_COLS = [
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
]

# (dicom, subject, study, view) in metadata order; the comment says where each row must end up.
METADATA = [
    ("d-pa", "10000032", "50000001", "PA"),  # kept, train
    ("d-lat", "10000032", "50000001", "LATERAL"),  # not_frontal
    ("d-ll", "10000032", "50000001", "LL"),  # not_frontal
    ("d-blank", "10000032", "50000001", ""),  # not_frontal
    ("d-ap", "11000001", "50000002", "AP"),  # kept, validate -> valid
    ("d-test", "11000001", "50000003", "AP"),  # kept, test -> valid (or test)
    ("d-nosplit", "12000001", "50000004", "PA"),  # not_in_split
    ("d-norep", "12000001", "50000005", "PA"),  # no_report (no report file for the study)
    ("d-notext", "12000001", "50000006", "PA"),  # no_text (report, but no impression/findings)
    ("d-digits", "12000001", "50000007", "PA"),  # empty_after_cleaning ("1." and "___")
    ("d-badrep", "13000001", "50000008", "PA"),  # kept, rejected later: report not UTF-8
    ("d-pa", "10000032", "50000001", "PA"),  # kept, rejected later: duplicate dicom_id
]
SPLIT = [
    (d, sub, st, s)
    for (d, sub, st, _), s in zip(
        METADATA,
        ["train", "train", "train", "train", "validate", "test", None, "train", "train", "train", "train", "train"],
    )
    if s is not None
]
REPORTS = {
    ("10000032", "50000001"): "\n FINDINGS: Lungs clear.\n \n IMPRESSION: Normal chest.\n",
    ("11000001", "50000002"): "\n CONCLUSION: Small effusion.\n",
    ("11000001", "50000003"): "\n FINDING: Tube in place.\n",
    ("12000001", "50000004"): "\n IMPRESSION: Fine.\n",
    ("12000001", "50000006"): "\n INDICATION: cough\n \n COMPARISON: none\n",
    ("12000001", "50000007"): "\n IMPRESSION: 1.\n FINDINGS: ___\n",
}


def write_csv(path, header, rows, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def make_root(tmp_path, gz=False):
    root = tmp_path / "2.0.0"
    (root / "files").mkdir(parents=True)
    suffix = ".gz" if gz else ""
    write_csv(
        root / f"mimic-cxr-2.0.0-metadata.csv{suffix}",
        META_COLS,
        [
            [d, sub, st, "CHEST (PA AND LAT)", v, 3056, 2544, 21800506, 213014.531, "", "", ""]
            for d, sub, st, v in METADATA
        ],
        gz,
    )
    write_csv(
        root / f"mimic-cxr-2.0.0-split.csv{suffix}",
        ["dicom_id", "study_id", "subject_id", "split"],
        [[d, st, sub, s] for d, sub, st, s in dict.fromkeys(SPLIT)],
        gz,
    )
    write_csv(
        root / f"mimic-cxr-2.0.0-chexpert.csv{suffix}",
        ["subject_id", "study_id", *CHEXPERT_LABELS],
        [["10000032", "50000001", "1.0", "", "0.0", "-1.0"] + [""] * 10],
        gz,
    )
    for (sub, st), text in REPORTS.items():
        d = root / "files" / f"p{sub[:2]}" / f"p{sub}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"s{st}.txt").write_text(text, encoding="utf-8")
    bad = root / "files" / "p13" / "p13000001"
    bad.mkdir(parents=True)
    (bad / "s50000008.txt").write_bytes(b"\n IMPRESSION: \xff\xfe\n")
    return root


@pytest.mark.parametrize("gz", [False, True])
def test_filters_joins_and_split_mapping(tmp_path, gz):
    root = make_root(tmp_path, gz)
    res = build_master(root)
    assert res.input_rows == len(METADATA)
    assert list(res.filtered) == list(FILTER_RULES)
    assert res.filtered == {
        "not_frontal": 3,
        "no_report": 1,
        "no_text": 1,
        "not_in_split": 1,
        "empty_after_cleaning": 1,
    }
    assert len(res.rows) + sum(res.filtered.values()) == res.input_rows
    by = [(r.dicom_id, r.split, r.reject) for r in res.rows]
    assert [b[:2] for b in by] == [
        ("d-pa", "train"),
        ("d-ap", "valid"),
        ("d-test", "valid"),
        ("d-badrep", "train"),
        ("d-pa", "train"),
    ]
    first, ap, test, badrep, dup = res.rows
    assert first.reject == "" and ap.reject == "" and test.reject == ""
    assert "not UTF-8" in badrep.reject and badrep.reject_source.endswith("s50000008.txt")
    assert dup.reject.startswith("duplicate dicom_id")
    # Path and id forms exactly as MGCA writes them.
    assert first.Path == "2.0.0/files/p10/p10000032/s50000001/d-pa.jpg"
    assert (first.subject_id, first.study_id, first.ViewPosition) == ("10000032", "s50000001", "PA")
    assert (first.impression, first.findings) == ("Normal chest.", "Lungs clear.")
    assert first.text == "Normal chest. Lungs clear."
    # conclusion -> impression, finding -> findings
    assert ap.impression == "Small effusion." and test.findings == "Tube in place."
    assert image_path(root, first.Path) == root / "files/p10/p10000032/s50000001/d-pa.jpg"


def test_keep_test_split(tmp_path):
    res = build_master(make_root(tmp_path), keep_test=True)
    assert {r.dicom_id: r.split for r in res.rows}["d-test"] == "test"
    assert {r.dicom_id: r.split for r in res.rows}["d-ap"] == "valid"


def test_reports_dir_and_sectioned_csv(tmp_path):
    root = make_root(tmp_path)
    reports = tmp_path / "reports"
    (root / "files").rename(reports)
    (root / "files").mkdir()
    out = tmp_path / "out" / "mimic_cxr_sectioned.csv"
    res = build_master(root, reports_dir=reports, sectioned_csv=out)
    assert len(res.rows) == 5
    with out.open(newline="", encoding="utf-8") as fh:
        studies = [r["study"] for r in csv.DictReader(fh)]
    assert studies == sorted(f"s{st}" for _, st in REPORTS)
    assert [p["key"] for p in res.report_problems] == ["s50000008"]


def test_master_csv_round_trip(tmp_path):
    root = make_root(tmp_path)
    res = build_master(root)
    path = tmp_path / "master.csv"
    write_master_csv(res.rows, path)
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == MASTER_COLUMNS
    # Missing text is written as a single space (MGCA's fillna(" ")).
    assert rows[4][5:7] == [" ", " "]
    back = read_master_csv(path)
    assert back.input_rows == 5
    assert [(r.dicom_id, r.split, r.text) for r in back.rows[:3]] == [
        (r.dicom_id, r.split, r.text) for r in res.rows[:3]
    ]
    # The unreadable report's row has no text in master.csv: filtered there, like MGCA would.
    assert back.filtered["no_text"] == 1 and len(back.rows) == 4
    assert back.rows[3].reject.startswith("duplicate dicom_id")


def test_master_csv_input_rules(tmp_path):
    path = tmp_path / "master.csv"
    write_csv(
        path,
        MASTER_COLUMNS,
        [
            ["2.0.0/files/p10/p10000032/s50000001/a.jpg", "a", "10000032", "s50000001", "PA", "Ok.", " ", "train"],
            ["2.0.0/files/p10/p10000032/s50000001/b.jpg", "b", "10000032", "s50000001", "LATERAL", "Ok.", " ", "train"],
            ["2.0.0/files/p10/p10000032/s50000001/c.jpg", "c", "10000032", "s50000001", "AP", " ", " ", "valid"],
            ["2.0.0/files/p10/p10000032/s50000001/d.jpg", "d", "10000032", "s50000001", "AP", "2.", " ", "valid"],
            ["2.0.0/files/p10/p10000032/s50000001/e.jpg", "e", "10000032", "s50000001", "AP", "Ok.", "", "test"],
        ],
    )
    res = read_master_csv(path, keep_test=True)
    assert res.filtered["no_text"] == 1 and res.filtered["empty_after_cleaning"] == 1
    assert [(r.dicom_id, r.split) for r in res.rows] == [("a", "train"), ("b", "train"), ("e", "test")]
    assert res.rows[1].reject.startswith("unknown view 'LATERAL'")


def test_chexpert_labels(tmp_path):
    root = make_root(tmp_path)
    labels = read_chexpert_labels(root / "mimic-cxr-2.0.0-chexpert.csv")
    row = labels[("10000032", "50000001")]
    assert list(row) == list(CHEXPERT_LABELS)
    assert (row["Atelectasis"], row["Cardiomegaly"], row["Consolidation"], row["Edema"]) == (1.0, None, 0.0, -1.0)


def test_missing_inputs_fail_with_their_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_master(tmp_path / "nowhere")
    root = make_root(tmp_path)
    (root / "mimic-cxr-2.0.0-split.csv").unlink()
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-split.csv"):
        build_master(root)
    root = make_root(tmp_path / "b")
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv", ["dicom_id", "subject_id", "study_id"], [["x", "1", "2"]])
    with pytest.raises(ValueError, match=r"metadata.csv: missing column\(s\) \['ViewPosition'\]"):
        build_master(root)
    with pytest.raises(FileNotFoundError, match="reports directory"):
        build_master(make_root(tmp_path / "c"), reports_dir=tmp_path / "no_reports")
    with pytest.raises(FileNotFoundError, match="master csv not found"):
        read_master_csv(tmp_path / "absent.csv")
    bad_split = make_root(tmp_path / "d")
    write_csv(
        bad_split / "mimic-cxr-2.0.0-split.csv",
        ["dicom_id", "study_id", "subject_id", "split"],
        [["d-pa", "50000001", "10000032", "holdout"]],
    )
    with pytest.raises(ValueError, match="split 'holdout'"):
        build_master(bad_split)
