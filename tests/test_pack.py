"""pack_mimic end to end on a small hand-made MIMIC-CXR-JPG tree: readers, determinism, reruns,
bad inputs, accounting, verification."""

import csv
import io
import json
import os
import shutil
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.image import reduce_image_bytes
from shards.master import MASTER_COLUMNS
from shards.mimic import DEFAULT_MAX_SIDE, PackOptions, pack_mimic
from shards.schema import CHEXPERT_LABELS, read_manifest, split_shards
from shards.verify import ShardError, verify_dataset
from tools.verify_shards import main as verify_main

SPS = 8  # samples per shard: several shards per split from a few dozen images
N_STUDIES = 30
# dicom ids of the deliberately broken inputs -> the reason text each must be rejected with
BAD_IMAGES = {
    "missing": "image file missing",
    "zerobyte": "image file is empty",
    "truncated": "truncated",
    "corrupt": "not a decodable image",
}
BAD_REPORTS = {"emptyrep": "empty report", "latin1rep": "not UTF-8"}
DUPLICATE = "dup"


def _jpeg(rng, h, w):
    """Gray radiograph stand-in with a black border (so the crop does something)."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = (
        (60 + 120 * np.exp(-((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / (0.1 * h * w)) + rng.normal(0, 12, (h, w)))
        .clip(1, 255)
        .astype(np.uint8)
    )
    img[:, : w // 10] = 0
    img[: h // 12] = 0
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def make_corpus(root: Path, seed: int = 0) -> dict:
    """MIMIC-CXR-JPG layout: csvs, files/p../p../s../<dicom>.jpg and the reports beside them.
    Returns {"good": [dicom ids that must be packed], ...}."""
    rng = np.random.default_rng(seed)
    meta, split, chex, good = [], [], [], []
    studies = []
    for i in range(N_STUDIES):
        subject = f"{10000000 + 37 * (i // 2) + 1000000 * (i % 9)}"
        study = f"{50000000 + 101 * i}"
        studies.append((subject, study))
        views = ["PA", "LATERAL"] if i % 3 else ["AP"]
        for j, view in enumerate(views):
            dicom = f"{i:04x}aa00-{j:04x}bbbb-cccc0000-dddd{i:04d}-e{j}"
            meta.append([dicom, subject, study, view])
            split.append([dicom, study, subject, "validate" if i % 5 == 0 else ("test" if i % 7 == 0 else "train")])
            d = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{dicom}.jpg").write_bytes(_jpeg(rng, 300 + 7 * i, 240 + 3 * i))
            if view != "LATERAL":
                good.append(dicom)
        chex.append([subject, study] + [["1.0", "0.0", "-1.0", ""][(i + k) % 4] for k in range(14)])
        (root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt").write_text(
            f"                FINAL REPORT\n EXAMINATION: CHEST\n \n FINDINGS: Study {i} lungs clear.\n"
            f" 1. Heart size {i}.5 cm.\n \n IMPRESSION: No acute process {i}.\n",
            encoding="utf-8",
        )
    # Broken inputs, each in its own extra study (frontal, in the train split).
    extra = list(BAD_IMAGES) + list(BAD_REPORTS)
    for k, name in enumerate(extra):
        subject, study = f"{19000000 + k}", f"{59000000 + k}"
        d = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        d.mkdir(parents=True)
        data = _jpeg(rng, 200, 180)
        payload = {
            "missing": None,
            "zerobyte": b"",
            "truncated": data[: len(data) // 2],
            "corrupt": b"\x00" * 64 + data[64:],
        }.get(name, data)
        if payload is not None:
            (d / f"{name}.jpg").write_bytes(payload)
        report = d.parent / f"s{study}.txt"
        if name == "emptyrep":
            report.write_bytes(b" \n")
        elif name == "latin1rep":
            report.write_bytes(b"\n IMPRESSION: No pneumothorax, caf\xe9.\n")
        else:
            report.write_text("\n IMPRESSION: Fine.\n", encoding="utf-8")
        meta.append([name, subject, study, "PA"])
        split.append([name, study, subject, "train"])
    # A duplicated dicom_id: the same metadata row twice (second one rejected).
    meta.append(list(meta[0]))
    _write_csv(root / "mimic-cxr-2.0.0-metadata.csv", ["dicom_id", "subject_id", "study_id", "ViewPosition"], meta)
    _write_csv(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"], split)
    _write_csv(root / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id", *CHEXPERT_LABELS], chex)
    return {"good": good, "n_meta": len(meta), "n_lateral": sum(r[3] == "LATERAL" for r in meta)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic") / "2.0.0"
    info = make_corpus(root)
    out = root.parent / "shards_w1"
    manifest = pack_mimic(root, out, PackOptions(samples_per_shard=SPS, workers=1, seed=3), progress=False)
    return {"root": root, "out": out, "manifest": manifest, **info}


def tar_samples(out: Path) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over every shard, read in memory; a repeated key fails."""
    manifest = read_manifest(out)
    samples: dict[str, dict[str, bytes]] = {}
    for split in manifest["splits"]:
        for shard in split_shards(out, manifest, split):
            with tarfile.open(shard["path"]) as tar:
                for member in tar:
                    key, ext = member.name.split(".", 1)
                    sample = samples.setdefault(key, {})
                    assert ext not in sample, f"{member.name} packed twice"
                    sample[ext] = tar.extractfile(member).read()
    return samples


def tree_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_every_good_row_packed_once_with_its_metadata(corpus):
    manifest, samples = corpus["manifest"], tar_samples(corpus["out"])
    assert sorted(samples) == sorted(corpus["good"])
    assert all(set(s) == {"jpg", "txt", "json"} for s in samples.values())
    splits = manifest["splits"]
    assert list(splits) == ["train", "valid"] and all(len(splits[s]["shards"]) >= 2 for s in splits)
    key = corpus["good"][0]
    meta = json.loads(samples[key]["json"])
    assert set(meta) == {
        "dataset",
        "dicom_id",
        "subject_id",
        "study_id",
        "view",
        "split",
        "labels",
        "impression",
        "findings",
        "orig_size",
        "crop_box",
        "scale",
        "stored_size",
        "crc32",
    }
    assert meta["crc32"] == {ext: zlib.crc32(samples[key][ext]) for ext in ("jpg", "txt")}
    assert meta["dicom_id"] == key and meta["view"] == "AP" and meta["split"] == "valid"
    assert len(meta["study_id"]) == 8 and not meta["study_id"].startswith("s")
    assert list(meta["labels"]) == list(CHEXPERT_LABELS)
    assert [meta["labels"][n] for n in CHEXPERT_LABELS[:4]] == [1.0, 0.0, -1.0, None]
    assert meta["impression"] == "No acute process 0."
    assert meta["findings"] == "Study 0 lungs clear. Heart size 0.5 cm."
    assert samples[key]["txt"].decode() == "No acute process 0. Study 0 lungs clear. Heart size 0.5 cm."
    # The stored image is the reduced source: crop box from the black border, never upscaled here.
    src = (corpus["root"] / "files/p10/p10000000/s50000000" / f"{key}.jpg").read_bytes()
    red = reduce_image_bytes(src, DEFAULT_MAX_SIDE)
    assert meta["crop_box"] == red.crop_box and meta["stored_size"] == red.stored_size
    assert meta["orig_size"] == [240, 300]
    # The 24-column / 25-row black border is cropped (to within JPEG ringing at its edge).
    assert abs(red.crop_box[0] - 24) <= 2 and abs(red.crop_box[1] - 25) <= 2
    with Image.open(io.BytesIO(samples[key]["jpg"])) as img:
        assert img.mode == "L" and list(img.size) == meta["stored_size"]


def test_bad_inputs_rejected_with_reasons_and_counts_add_up(corpus):
    manifest = corpus["manifest"]
    rejected = {r["key"]: r for r in manifest["rejected"]}
    for key, reason in {**BAD_IMAGES, **BAD_REPORTS}.items():
        assert reason in rejected[key]["reason"], rejected[key]
    for key in BAD_IMAGES:
        assert rejected[key]["source"].endswith(f"{key}.jpg")
    for key in BAD_REPORTS:
        assert rejected[key]["source"].endswith(".txt")
    # The duplicated row repeats metadata row 0: its second occurrence is the rejected one.
    dups = [r for r in manifest["rejected"] if r["reason"].startswith("duplicate dicom_id")]
    assert [d["key"] for d in dups] == [corpus["good"][0]]
    counts = manifest["counts"]
    assert counts["input_rows"] == corpus["n_meta"]
    assert counts["packed"] == len(corpus["good"]) == manifest["num_samples"]
    assert counts["rejected"] == len(BAD_IMAGES) + len(BAD_REPORTS) + 1
    assert manifest["filtered"]["not_frontal"] == corpus["n_lateral"] == counts["filtered"]
    assert counts["packed"] + counts["rejected"] + counts["filtered"] == counts["input_rows"]
    assert manifest["config"]["samples_per_shard"] == SPS and manifest["config"]["seed"] == 3
    assert {"max_side", "quality", "keep_test", "crop_threshold", "inputs_sha256"} <= set(manifest["config"])
    # The master and sectioned csvs are written next to the shards.
    with (corpus["out"] / "master.csv").open(newline="", encoding="utf-8") as fh:
        assert tuple(next(csv.reader(fh))) == MASTER_COLUMNS
    assert (corpus["out"] / "mimic_cxr_sectioned.csv").is_file()


def test_webdataset_and_dali_read_the_same_bytes(corpus):
    import webdataset as wds
    from nvidia.dali import fn, pipeline_def

    out, expected = corpus["out"], tar_samples(corpus["out"])
    manifest = read_manifest(out)
    shards = [s for split in manifest["splits"] for s in split_shards(out, manifest, split)]

    seen = {}
    for sample in wds.WebDataset([s["path"] for s in shards], shardshuffle=False, empty_check=False):
        assert sample["__key__"] not in seen
        seen[sample["__key__"]] = {ext: sample[ext] for ext in ("jpg", "txt", "json")}
    assert seen == expected

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def reader():
        jpg, txt, meta = fn.readers.webdataset(
            paths=[s["path"] for s in shards],
            index_paths=[s["index_path"] for s in shards],
            ext=["jpg", "txt", "json"],
            missing_component_behavior="error",
            name="r",
        )
        return jpg, txt, meta

    pipe = reader()
    pipe.build()
    epoch = pipe.reader_meta("r")["epoch_size"]
    assert epoch == manifest["num_samples"]
    dali = {}
    for _ in range(epoch):
        jpg, txt, meta = (bytes(np.asarray(t.at(0))) for t in pipe.run())
        key = json.loads(meta)["dicom_id"]
        assert key not in dali
        dali[key] = {"jpg": jpg, "txt": txt, "json": meta}
    assert dali == expected


def test_same_bytes_for_1_and_2_workers(corpus, tmp_path):
    out2 = tmp_path / "w2"
    pack_mimic(corpus["root"], out2, PackOptions(samples_per_shard=SPS, workers=2, seed=3), progress=False)
    assert tree_bytes(out2) == tree_bytes(corpus["out"])


def test_seed_changes_the_order_only(corpus, tmp_path):
    options = PackOptions(samples_per_shard=SPS, workers=1, seed=4)
    other = pack_mimic(corpus["root"], tmp_path / "s4", options, progress=False)
    assert other["counts"] == corpus["manifest"]["counts"]
    assert sorted(tar_samples(tmp_path / "s4")) == sorted(tar_samples(corpus["out"]))
    first = lambda m: m["_shard_records"][0]["keys"]  # noqa: E731
    assert first(other) != first(corpus["manifest"])


def test_rerun_rebuilds_only_the_missing_shard(corpus, tmp_path):
    out = tmp_path / "rerun"
    shutil.copytree(corpus["out"], out)
    before = tree_bytes(out)
    names = [s["name"] for split in corpus["manifest"]["splits"].values() for s in split["shards"]]
    victim = out / names[1]
    victim.unlink()
    mtimes = {n: os.stat(out / n).st_mtime_ns for n in names if n != names[1]}
    pack_mimic(corpus["root"], out, PackOptions(samples_per_shard=SPS, workers=1, seed=3), progress=False)
    assert tree_bytes(out) == before
    assert {n: os.stat(out / n).st_mtime_ns for n in mtimes} == mtimes


def test_existing_master_csv_input(corpus, tmp_path):
    master = tmp_path / "master.csv"
    with (corpus["out"] / "master.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    lateral = list(rows[1])
    lateral[1], lateral[4] = "lateralview", "LATERAL"
    with master.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows + [lateral])
    manifest = pack_mimic(
        corpus["root"],
        tmp_path / "from_master",
        PackOptions(samples_per_shard=SPS, workers=1, seed=3),
        master_csv=master,
        progress=False,
    )
    reasons = {r["key"]: r["reason"] for r in manifest["rejected"]}
    assert reasons["lateralview"].startswith("unknown view 'LATERAL'")
    assert sorted(tar_samples(tmp_path / "from_master")) == sorted(corpus["good"])
    c = manifest["counts"]
    assert c["input_rows"] == len(rows) and c["packed"] + c["rejected"] + c["filtered"] == c["input_rows"]


def test_missing_inputs_fail_with_their_names(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_root"):
        pack_mimic(tmp_path / "no_such_root", tmp_path / "o")
    root = tmp_path / "r" / "2.0.0"
    shutil.copytree(corpus["root"], root, ignore=shutil.ignore_patterns("files"))
    (root / "files").mkdir()
    (root / "mimic-cxr-2.0.0-chexpert.csv").unlink()
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-chexpert.csv"):
        pack_mimic(root, tmp_path / "o")
    _write_csv(root / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id", "Atelectasis"], [])
    with pytest.raises(ValueError, match="missing column.*Cardiomegaly"):
        pack_mimic(root, tmp_path / "o")


def test_verify_passes_then_names_a_flipped_shard(corpus, tmp_path, capsys):
    summary = verify_dataset(corpus["out"])
    assert summary["num_samples"] == len(corpus["good"])
    assert verify_main([str(corpus["out"]), "--workers", "1"]) == 0
    out = tmp_path / "flipped"
    shutil.copytree(corpus["out"], out)
    name = corpus["manifest"]["splits"]["valid"]["shards"][0]["name"]
    data = bytearray((out / name).read_bytes())
    data[len(data) // 3] ^= 0x01
    (out / name).write_bytes(bytes(data))
    with pytest.raises(ShardError, match=name):
        verify_dataset(out)
    capsys.readouterr()
    assert verify_main([str(out), "--workers", "2"]) == 1
    assert name in capsys.readouterr().err


def test_verify_catches_an_index_that_does_not_match(corpus, tmp_path):
    out = tmp_path / "badidx"
    shutil.copytree(corpus["out"], out)
    name = corpus["manifest"]["splits"]["train"]["shards"][1]["index"]
    lines = (out / name).read_text().splitlines()
    lines[1] = lines[1].replace(" 512 ", " 1024 ", 1)
    (out / name).write_text("\n".join(lines) + "\n")
    with pytest.raises(ShardError, match=name.replace(".idx", ".tar")):
        verify_dataset(out)


def test_synthetic_corpus_packs_and_verifies(tmp_path):
    from shards.synthetic.mimic import generate_mimic

    root = tmp_path / "synthetic"
    generate_mimic(root, n=24, seed=1, size=256, workers=1)
    manifest = pack_mimic(
        root, tmp_path / "out", PackOptions(samples_per_shard=4, workers=1, seed=0, keep_test=True), progress=False
    )
    assert list(manifest["splits"]) == ["train", "valid", "test"]
    assert all(manifest["splits"][s]["num_samples"] > 0 for s in manifest["splits"])
    c = manifest["counts"]
    assert c["rejected"] == 0 and c["packed"] + c["filtered"] == c["input_rows"]
    assert manifest["filtered"]["not_frontal"] > 0
    samples = tar_samples(tmp_path / "out")
    assert len(samples) == manifest["num_samples"]
    assert all(s["txt"].decode("utf-8").strip() for s in samples.values())
    assert verify_dataset(tmp_path / "out")["num_samples"] == manifest["num_samples"]


def _framed_jpeg(h: int, w: int, frame: int) -> bytes:
    """A smooth radiograph stand-in whose left `frame` columns are black (a detector frame)."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = (60 + 150 * np.exp(-((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / (0.2 * h * w))).astype(np.uint8)
    img[:, :frame] = 0
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_draft_decodes_finer_when_the_crop_would_store_less_than_max_side():
    # 2048 px wide: the 1/8 draft is exactly 256 px, and cropping the 400-px frame would leave 206 px.
    # The packer decodes once more at 1/4, so the stored longer side is still max_side, with the
    # geometry and pixels of a full-resolution decode (within resampling differences).
    from shards.image import decode_gray, reduce_array

    data = _framed_jpeg(1600, 2048, 400)
    red = reduce_image_bytes(data, DEFAULT_MAX_SIDE)
    full = reduce_array(decode_gray(data).gray, DEFAULT_MAX_SIDE)  # no draft: the reference
    assert red.orig_size == [2048, 1600]
    assert red.stored_size == full.stored_size and max(red.stored_size) == DEFAULT_MAX_SIDE
    assert all(abs(a - b) <= 8 for a, b in zip(red.crop_box, full.crop_box))
    assert np.abs(red.image.astype(int) - full.image.astype(int)).mean() < 2
    # Without a frame the 1/8 draft is enough: the same stored size, one decode.
    plain = reduce_image_bytes(_framed_jpeg(1600, 2048, 0), DEFAULT_MAX_SIDE)
    assert plain.stored_size == [256, 200] and plain.scale == [0.125, 0.125]


def test_one_chunk_decode_still_rejects_a_truncated_jpeg():
    # The whole file goes to libjpeg in one call (decode_gray): a cut file must still be an error,
    # never a gray-padded image.
    data = _framed_jpeg(1600, 2048, 0)
    with pytest.raises(OSError, match="truncated"):
        reduce_image_bytes(data[: len(data) // 2], DEFAULT_MAX_SIDE)
