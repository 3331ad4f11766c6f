"""Downstream converters on their synthetic native-format fixtures: counts, splits (deterministic,
patient-disjoint), data-efficiency subsets, labels/boxes/masks read back from the shards, and every
kind of bad input (recorded rejection or a clear structural error)."""

import csv
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLosslessSV1

from shards.dicom import rle_decode
from shards.downstream import CONVERTERS, DATASETS, convert
from shards.downstream.chexpert import UNCERTAIN_TO
from shards.downstream.common import SourceError, split_counts, subset_indices
from shards.image import Reduced, transform_mask
from shards.synthetic.downstream import write_all

N = 24
MAX_SIDE = 128


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    counts = write_all(root, N, seed=3, workers=2)
    return root, counts


@pytest.fixture(scope="module")
def packed(fixtures, tmp_path_factory):
    src, _ = fixtures
    out = tmp_path_factory.mktemp("shards")
    manifests = {
        name: convert(
            name, src / name, out, max_side=MAX_SIDE, quality=90, workers=2, seed=0, samples_per_shard=8, progress=False
        )
        for name in DATASETS
    }
    return out, manifests


def read_samples(root: Path, manifest: dict, split: str) -> dict[str, dict[str, bytes]]:
    """key -> {ext: payload} for every sample of a split, tar members read in memory."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(root / shard["name"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def all_samples(out: Path, manifest: dict) -> dict[str, dict]:
    root = out / manifest["dataset"]
    return {split: read_samples(root, manifest, split) for split in manifest["splits"]}


def meta_of(sample) -> dict:
    return json.loads(sample["json"])


def stored(meta, boxes):
    x0, y0 = meta["crop_box"][:2]
    sx, sy = meta["scale"]
    return [[(x1 - x0) * sx, (y1 - y0) * sy, (x2 - x0) * sx, (y2 - y0) * sy] for x1, y1, x2, y2 in boxes]


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DATASETS)
def test_counts_splits_and_subsets(packed, name):
    out, manifests = packed
    m = manifests[name]
    s = m["summary"]
    assert s["packed"] + s["rejected"] + s["filtered"] == s["input_images"] and s["rejected"] == 0
    assert set(m["splits"]) == {"train", "valid", "test"}
    assert all(m["splits"][k]["num_samples"] > 0 for k in m["splits"])
    samples = all_samples(out, m)
    for split, members in samples.items():
        assert len(members) == m["splits"][split]["num_samples"]
        for key, sample in members.items():
            assert list(sample)[:3] == ["jpg", "txt", "json"] and sample["txt"] == b""
            meta = meta_of(sample)
            assert meta["dataset"] == name and meta["key"] == key
            assert list(meta["labels"]) == m["label_names"]
            img = Image.open(io.BytesIO(sample["jpg"]))
            assert list(img.size) == meta["stored_size"] and max(img.size) <= MAX_SIDE
            assert ("png" in sample) == m["has_masks"]
            if m["has_masks"]:
                assert Image.open(io.BytesIO(sample["png"])).size == img.size
    # Disjoint by patient: no patient id in two splits.
    patients = {split: {meta_of(x)["patient_id"] for x in members.values()} for split, members in samples.items()}
    assert (
        not patients["train"] & patients["valid"]
        and not patients["train"] & patients["test"]
        and not patients["valid"] & patients["test"]
    )
    assert not any(m["patient_overlap"].values())

    train = list(samples["train"])
    pool = m["balanced"]["train"] if name == "siim_pneumothorax" else train
    assert set(pool) <= set(train)
    for task, subsets in m["task_subsets"].items():
        style = "frac" if task == "classification" else "choice"
        sub = subsets["train"]
        assert sorted(sub["1.0"]) == sorted(pool)
        for frac in ("0.01", "0.1"):
            n = len(pool)
            expected = max(1, round(float(frac) * n) if style == "frac" else int(float(frac) * n))
            assert len(sub[frac]) == expected and len(set(sub[frac])) == expected
            assert set(sub[frac]) <= set(pool)
            assert any(
                meta_of(samples["train"][k])["labels"]
                and (
                    max(meta_of(samples["train"][k])["labels"].values()) > 0
                    if name != "covidx"
                    else meta_of(samples["train"][k])["class_index"] != 0
                )
                for k in sub[frac]
            )
    assert m["subsets"] == m["task_subsets"][m["tasks"][0]]


def test_split_counts_follow_the_paper_proportions():
    assert split_counts(26684, {"train": 16010, "valid": 5337, "test": 5337}) == {
        "train": 16010,
        "valid": 5337,
        "test": 5337,
    }
    assert split_counts(12047, {"train": 8433, "valid": 1807, "test": 1807}) == {
        "train": 8433,
        "valid": 1807,
        "test": 1807,
    }
    assert split_counts(191027, {"train": 186027, "valid": 5000})["valid"] == 5000
    assert split_counts(10, {"train": 186027, "valid": 5000}) == {"train": 9, "valid": 1}


def test_subset_semantics_match_pandas_and_numpy():
    # pandas df.sample(frac=p, random_state=42) == RandomState(42).choice(n, round(p*n), replace=False)
    n = 1000
    want = np.random.RandomState(42).choice(n, round(0.1 * n), replace=False).tolist()
    assert subset_indices(n, 0.1, "frac", [True] * n) == want
    want = np.random.RandomState(42).choice(n, int(0.01 * n), replace=False).tolist()
    assert subset_indices(n, 0.01, "choice", [True] * n) == want
    # Tiny data: at least one sample, and a positive one swapped in when the draw has none.
    positive = [False] * 30
    positive[np.random.RandomState(42).permutation(30)[5]] = True
    chosen = subset_indices(30, 0.01, "choice", positive)
    assert len(chosen) == 1 and positive[chosen[0]]
    assert subset_indices(30, 1.0, "frac", positive) == list(range(30))


def test_deterministic_for_seed_and_workers(fixtures, packed, tmp_path):
    src, _ = fixtures
    out, manifests = packed
    name = "covidx"
    again = convert(
        name,
        src / name,
        tmp_path,
        max_side=MAX_SIDE,
        quality=90,
        workers=1,
        seed=0,
        samples_per_shard=8,
        progress=False,
    )
    first = manifests[name]
    assert again["splits"] == first["splits"]  # same bytes (sha256) per shard
    assert again["task_subsets"] == first["task_subsets"]
    other = convert(
        name,
        src / name,
        tmp_path / "seed1",
        max_side=MAX_SIDE,
        quality=90,
        workers=1,
        seed=1,
        samples_per_shard=8,
        progress=False,
    )

    def keys(m, split):
        return {k for rec in m["_shard_records"] if rec["name"].startswith(split + "/") for k in rec["keys"]}

    assert keys(other, "test") == keys(first, "test")  # official test list: seed-free
    assert keys(other, "train") != keys(first, "train")  # the train/valid cut moves


def test_rsna_boxes_masks_labels_round_trip(fixtures, packed):
    src, _ = fixtures
    out, manifests = packed
    with open(src / "rsna_pneumonia" / "stage_2_train_labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    boxes: dict[str, list] = {}
    for r in rows:
        box = boxes.setdefault(r["patientId"], [])
        if r["Target"] == "1":
            x, y, w, h = (float(r[c]) for c in ("x", "y", "width", "height"))
            box.append([x, y, x + w, y + h])
    seen = 0
    for members in all_samples(out, manifests["rsna_pneumonia"]).values():
        for sample in members.values():
            meta = meta_of(sample)
            src_boxes = boxes[meta["patient_id"]]
            assert meta["labels"] == {"Pneumonia": float(bool(src_boxes))}
            np.testing.assert_allclose(meta["boxes"], stored(meta, src_boxes) if src_boxes else [], atol=0.01)
            mask = np.asarray(Image.open(io.BytesIO(sample["png"]))) > 0
            assert mask.any() == bool(src_boxes)
            for x1, y1, x2, y2 in meta["boxes"]:  # the mask fills each box
                cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
                assert mask[cy, cx]
            if meta["dicom"]["photometric"] == "MONOCHROME1" or meta["dicom"]["bits_stored"] == 12:
                seen += 1
    assert seen > 0  # MONOCHROME1/12-bit exercised


def test_siim_masks_are_the_union_of_rle_rows(fixtures, packed):
    src, _ = fixtures
    out, manifests = packed
    m = manifests["siim_pneumothorax"]
    text = (src / "siim_pneumothorax" / "train-rle.csv").read_text()
    assert text.startswith("ImageId, EncodedPixels\n") and ", -1\n" in text
    with open(src / "siim_pneumothorax" / "train-rle.csv", newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    runs: dict[str, list[str]] = {}
    for image_id, rle in rows:
        runs.setdefault(image_id.replace(".", "_"), [])
        if rle.strip() != "-1":
            runs[image_id.replace(".", "_")].append(rle)
    assert any(len(v) > 1 for v in runs.values())  # a multi-row image exists
    negatives = 0
    for members in all_samples(out, m).values():
        for key, sample in members.items():
            meta = meta_of(sample)
            full = np.zeros((1024, 1024), bool)
            for rle in runs[key]:
                full |= rle_decode(rle, 1024, 1024)
            red = Reduced(
                np.zeros(meta["stored_size"][::-1], np.uint8), meta["crop_box"], meta["scale"], meta["orig_size"]
            )
            want = transform_mask(full, red)
            got = np.asarray(Image.open(io.BytesIO(sample["png"])))
            np.testing.assert_array_equal(got, want)
            assert meta["labels"]["Pneumothorax"] == float(bool(runs[key]))
            negatives += not runs[key]
    assert negatives > 0  # " -1" rows are negatives
    balanced = m["balanced"]["train"]
    train_pos = [k for k in balanced if runs[k]]
    assert len(balanced) == 2 * len(train_pos)


def test_object_cxr_boxes_from_annotations(fixtures, packed):
    src, _ = fixtures
    out, manifests = packed
    ann = {}
    for which in ("train", "dev"):
        with open(src / "object_cxr" / f"{which}.csv", newline="") as fh:
            for r in csv.DictReader(fh):
                ann[f"{which}/{r['image_name']}"] = r["annotation"]
    shapes_seen = set()
    for members in all_samples(out, manifests["object_cxr"]).values():
        for sample in members.values():
            meta = meta_of(sample)
            objects = [o.split() for o in ann[meta["source"]].split(";") if o.strip()]
            want = []
            for obj in objects:
                xs, ys = [float(v) for v in obj[1::2]], [float(v) for v in obj[2::2]]
                want.append([min(xs), min(ys), max(xs), max(ys)])
            assert meta["labels"]["Foreign object"] == float(bool(objects))
            np.testing.assert_allclose(meta["boxes"], stored(meta, want) if want else [], atol=0.01)
            shapes_seen |= set(meta["box_shapes"])
    assert shapes_seen == {"rectangle", "ellipse", "polygon"}


def test_classification_labels_round_trip(fixtures, packed):
    src, _ = fixtures
    out, manifests = packed
    # CheXpert: fillna(0) + per-label uncertainty policy; laterals filtered.
    rows = {}
    for name in ("train", "valid"):
        with open(src / "chexpert" / "CheXpert-v1.0-small" / f"{name}.csv", newline="") as fh:
            rows.update({r["Path"]: r for r in csv.DictReader(fh)})
    checked_uncertain = 0
    for members in all_samples(out, manifests["chexpert"]).values():
        for sample in members.values():
            meta = meta_of(sample)
            row = rows[meta["source"]]
            assert row["Frontal/Lateral"] == "Frontal"
            for label, value in meta["labels"].items():
                cell = row[label]
                want = 0.0 if cell == "" else (UNCERTAIN_TO[label] if cell == "-1.0" else float(cell))
                assert value == want
                checked_uncertain += cell == "-1.0"
    assert checked_uncertain > 0
    assert manifests["chexpert"]["filtered"]["lateral_view"] > 0
    # ChestX-ray14: pipe-separated findings.
    with open(src / "chestxray14" / "Data_Entry_2017.csv", newline="") as fh:
        entries = {r["Image Index"]: r["Finding Labels"] for r in csv.DictReader(fh)}
    for members in all_samples(out, manifests["chestxray14"]).values():
        for sample in members.values():
            meta = meta_of(sample)
            names = set(entries[meta["key"] + ".png"].split("|")) - {"No Finding"}
            assert {k for k, v in meta["labels"].items() if v} == names
    # COVIDx: class index and one-hot named labels.
    lists = {}
    for which in ("train", "test"):
        for line in (src / "covidx" / f"{which}_COVIDx9A.txt").read_text().splitlines():
            pid, filename, cls, _ = line.split()
            lists[f"{which}/{filename}"] = cls
    for members in all_samples(out, manifests["covidx"]).values():
        for sample in members.values():
            meta = meta_of(sample)
            cls = lists[meta["source"]]
            assert meta["class_index"] == ["normal", "pneumonia", "COVID-19"].index(cls)
            assert meta["labels"][cls] == 1.0 and sum(meta["labels"].values()) == 1.0


# ---------------------------------------------------------------------------------------------
# Bad input


def _copy(src: Path, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(src / name, dst)
    return dst


def _reasons(manifest) -> list[str]:
    return [r["reason"] for r in manifest["rejected"]]


def _assert_adds_up(m):
    s = m["summary"]
    assert s["packed"] + s["rejected"] + s["filtered"] == s["input_images"]
    assert s["packed"] == sum(v["num_samples"] for v in m["splits"].values())


def test_rsna_bad_files_and_rows_are_rejected(fixtures, tmp_path):
    src, _ = fixtures
    root = _copy(src, "rsna_pneumonia", tmp_path)
    dcms = sorted((root / "stage_2_train_images").glob("*.dcm"))
    dcms[0].unlink()  # missing
    dcms[1].write_bytes(b"not a dicom" * 50)  # unreadable
    ds = pydicom.dcmread(dcms[2])  # unsupported transfer syntax
    ds.PixelData = encapsulate([b"\xff\xd8junk\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.save_as(dcms[2], enforce_file_format=True)
    csv_path = root / "stage_2_train_labels.csv"
    lines = csv_path.read_text().splitlines()
    pid = [ln.split(",")[0] for ln in lines[1:] if ln.split(",")[0] not in {p.stem for p in dcms[:3]}]
    lines.append(f"{pid[0]},10,10,-5,20,1")  # non-positive size (whole patient)
    lines.append(f"{pid[-1]},900.0,900.0,400.0,300.0,1")  # outside the 1024 image
    csv_path.write_text("\n".join(lines) + "\n")
    m = convert(
        "rsna_pneumonia", root, tmp_path / "out", max_side=MAX_SIDE, workers=1, samples_per_shard=8, progress=False
    )
    reasons = " | ".join(_reasons(m))
    for why in (
        "DICOM file not found",
        "unreadable DICOM",
        "unsupported transfer syntax JPEG Lossless",
        "non-positive size",
        "outside the 1024x1024 image",
    ):
        assert why in reasons, why
    assert m["summary"]["rejected"] == 5
    _assert_adds_up(m)
    rejected_keys = {r["key"] for r in m["rejected"]}
    assert not rejected_keys & {k for sub in m["subsets"]["train"].values() for k in sub}


def test_siim_malformed_rle_is_rejected(fixtures, tmp_path):
    src, _ = fixtures
    root = _copy(src, "siim_pneumothorax", tmp_path)
    path = root / "train-rle.csv"
    lines = path.read_text().splitlines()
    negatives = [i for i, ln in enumerate(lines) if ln.endswith(", -1")]
    a, b = negatives[0], negatives[1]
    lines[a] = lines[a].split(",")[0] + ", 10 20 30"  # odd count
    lines[b] = lines[b].split(",")[0] + f", {1024 * 1024 - 5} 10"  # past the image end
    path.write_text("\n".join(lines) + "\n")
    m = convert(
        "siim_pneumothorax", root, tmp_path / "out", max_side=MAX_SIDE, workers=1, samples_per_shard=8, progress=False
    )
    reasons = " | ".join(_reasons(m))
    assert "odd number of values" in reasons and "past the 1024x1024 image" in reasons
    assert m["summary"]["rejected"] == 2
    _assert_adds_up(m)


def test_bad_rows_in_lists_and_annotations(fixtures, tmp_path):
    src, _ = fixtures
    # COVIDx: unknown class, wrong field count.
    root = _copy(src, "covidx", tmp_path)
    lst = root / "train_COVIDx9A.txt"
    lines = lst.read_text().splitlines()
    lines[0] = lines[0].replace(lines[0].split()[2], "tuberculosis")
    lines[1] = " ".join(lines[1].split()[:3])
    lst.write_text("\n".join(lines) + "\n")
    m = convert("covidx", root, tmp_path / "out", max_side=MAX_SIDE, samples_per_shard=8, progress=False)
    reasons = " | ".join(_reasons(m))
    assert "unknown class 'tuberculosis'" in reasons and "expected 4 fields" in reasons
    _assert_adds_up(m)
    # Object-CXR: unknown object type, odd coordinates, polygon outside the image.
    root = _copy(src, "object_cxr", tmp_path)
    p = root / "train.csv"
    with open(p, newline="") as fh:
        rows = list(csv.reader(fh))
    rows[1][1] = "7 1 2 3 4"
    rows[2][1] = "0 10 20 30"
    rows[3][1] = "2 10 10 5000 10 20 40"
    with open(p, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    m = convert("object_cxr", root, tmp_path / "out", max_side=MAX_SIDE, samples_per_shard=8, progress=False)
    reasons = " | ".join(_reasons(m))
    assert "unknown type '7'" in reasons and "needs 4 values" in reasons and "lies outside" in reasons
    _assert_adds_up(m)
    # CheXpert: a label value that is not 1/0/-1/blank.
    root = _copy(src, "chexpert", tmp_path)
    p = root / "CheXpert-v1.0-small" / "train.csv"
    with open(p, newline="") as fh:
        rows = list(csv.reader(fh))
    frontal = next(i for i, r in enumerate(rows) if i and r[3] == "Frontal")
    rows[frontal][rows[0].index("Edema")] = "2.0"
    with open(p, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    m = convert("chexpert", root, tmp_path / "out", max_side=MAX_SIDE, samples_per_shard=8, progress=False)
    assert any("column 'Edema'" in r for r in _reasons(m))
    _assert_adds_up(m)
    # ChestX-ray14: unknown finding name; listed image without a Data_Entry row.
    root = _copy(src, "chestxray14", tmp_path)
    p = root / "Data_Entry_2017.csv"
    lines = p.read_text().splitlines()
    fields = lines[1].split(",")
    fields[1] = "Effusion|Dragon"
    lines[1] = ",".join(fields)
    p.write_text("\n".join(lines) + "\n")
    with open(root / "test_list.txt", "a") as fh:
        fh.write("99999999_000.png\n")
    m = convert("chestxray14", root, tmp_path / "out", max_side=MAX_SIDE, samples_per_shard=8, progress=False)
    reasons = " | ".join(_reasons(m))
    assert "unknown finding name(s) ['Dragon']" in reasons and "has no row in Data_Entry_2017.csv" in reasons
    _assert_adds_up(m)


@pytest.mark.parametrize(
    "name, rel, column",
    [
        ("rsna_pneumonia", "stage_2_train_labels.csv", "Target"),
        ("siim_pneumothorax", "train-rle.csv", "EncodedPixels"),
        ("chexpert", "CheXpert-v1.0-small/valid.csv", "Frontal/Lateral"),
        ("object_cxr", "dev.csv", "annotation"),
        ("chestxray14", "Data_Entry_2017.csv", "Patient ID"),
    ],
)
def test_missing_column_is_a_clear_error(fixtures, tmp_path, name, rel, column):
    src, _ = fixtures
    root = _copy(src, name, tmp_path)
    path = root / rel
    header, rest = path.read_text().split("\n", 1)
    # Rename the column in the header (keeps the row width) so only the name is wrong.
    path.write_text(header.replace(column, column + "_renamed", 1) + "\n" + rest)
    with pytest.raises(SourceError, match=rf"{Path(rel).name}.*missing column.*{column}"):
        CONVERTERS[name](root, 0)


def test_missing_label_file_is_a_clear_error(fixtures, tmp_path):
    src, _ = fixtures
    root = _copy(src, "covidx", tmp_path)
    (root / "test_COVIDx9A.txt").unlink()
    with pytest.raises(SourceError, match="test_COVIDx9A.txt: file not found"):
        CONVERTERS["covidx"](root, 0)


def test_rsna_reads_through_the_training_loader(packed):
    """The packed output is what pipeline.build_loader expects: subset selection from
    task_subsets, masks and boxes following the image to the output size."""
    import torch

    from common.dist import DistInfo
    from pipeline import build_loader
    from pipeline.config import DataConfig

    out, manifests = packed
    m = manifests["rsna_pneumonia"]
    cfg = DataConfig(
        shards=str(out / "rsna_pneumonia"),
        backend="torch",
        batch_size_per_gpu=2,
        num_workers=0,
        transform="eval",
        image_size=64,
        shuffle=False,
        drop_last=False,
        subset="0.1",
        subset_task="detection",
        load_masks=True,
        load_boxes=True,
    )
    loader = build_loader(cfg, "train", DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    keys, n_boxes = [], 0
    for batch in loader:
        assert batch.image.shape[1:] == (3, 64, 64) and batch.mask.shape[1:] == (1, 64, 64)
        for i in range(len(batch.keys)):
            meta = batch.meta[i]
            assert len(batch.boxes[i]) == len(meta["boxes"])
            assert bool(batch.mask[i].any()) == bool(meta["boxes"])
            n_boxes += len(meta["boxes"])
        keys += batch.keys
    assert sorted(keys) == sorted(m["task_subsets"]["detection"]["train"]["0.1"])
    assert n_boxes > 0


def test_fixtures_are_deterministic_for_a_seed(tmp_path):
    def tree(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    names = ("rsna_pneumonia", "object_cxr", "covidx")
    write_all(tmp_path / "a", 4, seed=5, workers=1, datasets=names)
    write_all(tmp_path / "b", 4, seed=5, workers=2, datasets=names)
    write_all(tmp_path / "c", 4, seed=6, workers=1, datasets=names)
    a, b, c = tree(tmp_path / "a"), tree(tmp_path / "b"), tree(tmp_path / "c")
    assert a == b
    assert a.keys() != c.keys() or any(a[k] != c[k] for k in a)


# ---------------------------------------------------------------------------------------------
# ChestX-ray14 on real-download shapes: a partial tree, the v2020 label file name, a refused link


def _cxr14_tree(root: Path, n_rows: int, present: set[int], entry: str = "Data_Entry_2017.csv") -> Path:
    """A ChestX-ray14 tree whose label files list `n_rows` images (3 per patient, the last fifth in
    test_list) and whose images_001/images/ holds only the PNGs numbered in `present` (the split is
    drawn from the label files, so the PNGs are empty files here: nothing is packed)."""
    images = root / "images_001" / "images"
    images.mkdir(parents=True)
    names = [f"{i // 3 + 1:08d}_{i % 3:03d}.png" for i in range(n_rows)]
    with open(root / entry, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "View Position"])
        for i, name in enumerate(names):
            writer.writerow([name, "Effusion" if i % 4 == 0 else "No Finding", i % 3, i // 3 + 1, "PA"])
    cut = n_rows * 4 // 5
    (root / "train_val_list.txt").write_text("\n".join(names[:cut]) + "\n")
    (root / "test_list.txt").write_text("\n".join(names[cut:]) + "\n")
    for i in present:
        (images / names[i]).touch()
    return root


def _split_of(index) -> dict[str, str]:
    return {it.key: split for split, items in index.splits.items() for it in items}


def test_chestxray14_split_depends_on_the_label_files_only(tmp_path):
    """A partial download keeps every present image in the split the full download gives it."""
    n = 600
    full = _split_of(CONVERTERS["chestxray14"](_cxr14_tree(tmp_path / "full", n, set(range(n))), 0))
    present = set(np.random.default_rng(0).choice(n, 40, replace=False).tolist())
    index = CONVERTERS["chestxray14"](_cxr14_tree(tmp_path / "part", n, present), 0)
    part = _split_of(index)
    assert len(part) == 40 and {full[k] for k in part} >= {"train", "valid", "test"}
    assert part == {k: full[k] for k in part}
    missing = [r for r in index.rejected if "no such PNG" in r["reason"]]
    assert len(missing) == n - 40 and len(part) + len(missing) == index.input_images
    assert "refused" not in missing[0]["reason"]  # no link out of the root to name here


def test_chestxray14_reads_the_v2020_label_file_name(fixtures, tmp_path):
    src, _ = fixtures
    root = _copy(src, "chestxray14", tmp_path)
    (root / "Data_Entry_2017.csv").rename(root / "Data_Entry_2017_v2020.csv")
    m = convert("chestxray14", root, tmp_path / "out", max_side=MAX_SIDE, samples_per_shard=8, progress=False)
    assert m["num_samples"] > 0 and m["split_policy"].startswith("labels from Data_Entry_2017_v2020.csv;")
    _assert_adds_up(m)
    (root / "Data_Entry_2017_v2020.csv").unlink()
    with pytest.raises(SourceError, match="no Data_Entry_2017_v2020.csv or Data_Entry_2017.csv"):
        CONVERTERS["chestxray14"](root, 0)


def test_chestxray14_names_the_image_folder_link_it_refused(tmp_path):
    src = _cxr14_tree(tmp_path / "src", 12, set(range(12)))
    elsewhere = tmp_path / "elsewhere"
    (src / "images_001").rename(elsewhere)
    (src / "images_001").symlink_to(elsewhere, target_is_directory=True)
    index = CONVERTERS["chestxray14"](src, 0)
    assert sum(len(v) for v in index.splits.values()) == 0 and len(index.rejected) == 12
    expected = f"images_001 -> {elsewhere.resolve()} is a symlink out of {src}; refused"
    assert all(expected in r["reason"] for r in index.rejected), index.rejected[0]
