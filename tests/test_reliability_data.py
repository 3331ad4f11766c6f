"""Reliability of the data side (issue #11): hostile and clumsy inputs to the packers, the shards they
write and the data entry points. Each test reproduces one case of docs/reliability.md's "Data" table."""

import csv
import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from common.cli import run_main
from common.io import atomic_write_text
from shards.dicom import DicomError, percentile_window, read_dicom, unit_to_uint8
from shards.downstream import convert
from shards.downstream.common import read_image_file
from shards.image import ImageLimits, ImageRejected, decode_gray, reduce_image_bytes
from shards.mimic import PackOptions, pack_mimic
from shards.schema import CHEXPERT_LABELS, MEMBER_CRC_FIELD, ManifestError, read_manifest, split_shards
from shards.synthetic.downstream import write_all, write_dicom
from shards.verify import ShardError, verify_dataset
from shards.writer import LOCK_NAME, OutputLocked, output_lock
from tests.pipeline_fixtures import member_span
from tools import pack_downstream, pack_shards, synth_downstream, synth_mimic, verify_shards

ROOT = Path(__file__).resolve().parents[1]
META_HEADER = ["dicom_id", "subject_id", "study_id", "ViewPosition"]
SPLIT_HEADER = ["dicom_id", "study_id", "subject_id", "split"]


def radiograph(h: int, w: int, seed: int = 0) -> np.ndarray:
    """[h, w] uint8 stand-in: a bright blob with noise, black border on the left and top."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = 60 + 120 * np.exp(-((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / (0.1 * h * w)) + rng.normal(0, 12, (h, w))
    img = img.clip(1, 255).astype(np.uint8)
    img[:, : w // 10] = 0
    img[: h // 12] = 0
    return img


def jpeg_bytes(arr: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def mini_mimic(root: Path, n: int = 6, images: dict | None = None, reports: dict | None = None) -> list[str]:
    """A MIMIC-CXR-JPG tree of `n` one-image PA studies (train split); returns the dicom ids.
    `images[i]` / `reports[i]` replace study i's image bytes / report text (a callable gets the path
    and writes it itself, e.g. to make a symlink)."""
    meta, split, chex, ids = [], [], [], []
    for i in range(n):
        subject, study, dicom = f"{10000000 + i}", f"{50000000 + i}", f"img{i:03d}"
        d = root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}"
        d.mkdir(parents=True, exist_ok=True)
        image, report = (images or {}).get(i), (reports or {}).get(i)
        target = d / f"{dicom}.jpg"
        if callable(image):
            image(target)
        else:
            target.write_bytes(image if image is not None else jpeg_bytes(radiograph(200 + i, 180 + i, i)))
        rep = d.parent / f"s{study}.txt"
        if callable(report):
            report(rep)
        else:
            rep.write_text(
                report if report is not None else f"\n FINDINGS: Lungs clear {i}.\n\n IMPRESSION: Normal {i}.\n",
                encoding="utf-8",
            )
        meta.append([dicom, subject, study, "PA"])
        split.append([dicom, study, subject, "train"])
        chex.append([subject, study] + ["0.0"] * len(CHEXPERT_LABELS))
        ids.append(dicom)
    _write_csv(root / "mimic-cxr-2.0.0-metadata.csv", META_HEADER, meta)
    _write_csv(root / "mimic-cxr-2.0.0-split.csv", SPLIT_HEADER, split)
    _write_csv(root / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id", *CHEXPERT_LABELS], chex)
    return ids


def pack(root: Path, out: Path, master_csv=None, **options) -> dict:
    options.setdefault("samples_per_shard", 4)
    return pack_mimic(root, out, PackOptions(workers=1, seed=0, **options), master_csv=master_csv, progress=False)


def rejected_by_key(manifest: dict) -> dict[str, str]:
    return {r["key"]: r["reason"] for r in manifest["rejected"]}


def cli(main, argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of an entry point run the way `python -m` runs it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_main(main, argv)
    return exc.value.code, capsys.readouterr().err


def assert_one_error_line(code: int, err: str, *needles: str) -> None:
    """Exit 2, the last stderr line is the only `error:` line (progress bars may precede it)."""
    lines = err.strip().splitlines()
    assert code == 2 and lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error") for line in lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic") / "2.0.0"
    ids = mini_mimic(root, n=8)
    out = root.parent / "out"
    return {"root": root, "out": out, "ids": ids, "manifest": pack(root, out)}


# ---------------------------------------------------------------------------------------------
# 1. Per-member CRC-32: written at pack time, checked by verify-shards


def test_every_sample_json_carries_the_crc32_of_its_members(packed, tmp_path):
    manifest = packed["manifest"]
    for shard in split_shards(packed["out"], manifest, "train"):
        with tarfile.open(shard["path"]) as tar:
            members = {mem.name: tar.extractfile(mem).read() for mem in tar}
        for name, data in members.items():
            if name.endswith(".json"):
                key = name[:-5]
                crcs = json.loads(data)[MEMBER_CRC_FIELD]
                assert crcs == {ext: zlib.crc32(members[f"{key}.{ext}"]) for ext in ("jpg", "txt")}
    # Downstream converters go through the same writer (masks included).
    src = tmp_path / "src"
    write_all(src, 8, 0, datasets=("siim_pneumothorax",))
    m = convert(
        "siim_pneumothorax", src / "siim_pneumothorax", tmp_path / "ds", workers=1, samples_per_shard=4, progress=False
    )
    shard = split_shards(tmp_path / "ds" / "siim_pneumothorax", m, "train")[0]
    with tarfile.open(shard["path"]) as tar:
        members = {mem.name: tar.extractfile(mem).read() for mem in tar}
    key = next(n[:-5] for n in members if n.endswith(".json"))
    assert json.loads(members[f"{key}.json"])[MEMBER_CRC_FIELD] == {
        ext: zlib.crc32(members[f"{key}.{ext}"]) for ext in ("jpg", "txt", "png")
    }


def test_verify_names_shard_and_key_of_a_jpeg_with_zeroed_scan_data(packed, tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(packed["out"], out)
    shard = packed["manifest"]["splits"]["train"]["shards"][1]
    key, offset, size = member_span(out / shard["name"], 0, "jpg")
    data = bytearray((out / shard["name"]).read_bytes())
    start = offset + size // 2 - 150
    data[start : start + 300] = bytes(300)
    (out / shard["name"]).write_bytes(bytes(data))
    with Image.open(io.BytesIO(bytes(data[offset : offset + size]))) as img:
        img.load()  # the decoder accepts the damage: only the checksum sees it
    with pytest.raises(ShardError) as exc:
        verify_dataset(out)
    assert shard["name"] in str(exc.value) and f"sample {key}: jpg: crc32 mismatch" in str(exc.value)
    # Even with a manifest re-hashed to match the damaged file, the member checksum catches it.
    manifest = json.loads((out / "manifest.json").read_text())
    for entry in manifest["splits"]["train"]["shards"]:
        if entry["name"] == shard["name"]:
            entry["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=f"{shard['name']}: sample {key}: jpg: crc32 mismatch"):
        verify_dataset(out)


# ---------------------------------------------------------------------------------------------
# 2. 16-bit sources are windowed like DICOMs, never clipped


def _png16(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def test_16bit_png_is_percentile_windowed_not_clipped(tmp_path):
    values = radiograph(240, 200).astype(np.uint16) * 16  # 12-bit data in a 16-bit PNG
    with Image.open(io.BytesIO(_png16(values))) as img:
        assert img.mode.startswith("I;16")
        clipped = np.asarray(img.convert("L"))
    assert (clipped == 255).mean() > 0.5  # what convert("L") did
    decoded = decode_gray(_png16(values))
    assert decoded.window == "percentile" and decoded.gray.dtype == np.uint8
    np.testing.assert_array_equal(decoded.gray, unit_to_uint8(percentile_window(values)))  # one rescale
    assert (decoded.gray == 255).mean() < 0.01 and len(np.unique(decoded.gray)) > 100
    # Same path for MIMIC (a 16-bit PNG under a .jpg name) and the downstream readers.
    (tmp_path / "x.png").write_bytes(_png16(values))
    gray, info = read_image_file(tmp_path / "x.png")
    np.testing.assert_array_equal(gray, decoded.gray)
    assert info == {"window": "percentile"}
    red = reduce_image_bytes(_png16(values), 128)
    assert red.orig_size == [200, 240] and (red.image == 255).mean() < 0.02


# ---------------------------------------------------------------------------------------------
# 3. Two packers on one output directory


HOLD_LOCK = (
    "import sys, time\nfrom shards.writer import output_lock\n"
    "with output_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(60)\n"
)


def test_second_packer_on_one_output_fails_at_once_naming_the_holder(packed, tmp_path, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLocked, match=f"locked by pid {holder.pid}"):
            pack(packed["root"], out)
        assert not (out / "manifest.json").exists() and not (out / "train").exists()
        code, err = cli(pack_shards.main, ["--mimic", str(packed["root"]), "--out", str(out), "--workers", "1"], capsys)
        assert_one_error_line(code, err, f"locked by pid {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's lock: the next packer runs, and leaves the lock file empty.
    assert pack(packed["root"], out)["num_samples"] == len(packed["ids"])
    assert (out / LOCK_NAME).read_text() == ""


def test_lock_is_reentrant_in_one_process(tmp_path):
    with output_lock(tmp_path / "o"):
        with output_lock(tmp_path / "o"):
            assert (tmp_path / "o" / LOCK_NAME).read_text().strip() == str(os.getpid())
        assert (tmp_path / "o" / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert (tmp_path / "o" / LOCK_NAME).read_text() == ""


# ---------------------------------------------------------------------------------------------
# 4. Symlinks: nothing from outside the dataset root; symlinked folders inside it are followed


def test_image_or_report_symlinked_out_of_the_mimic_root_is_refused(tmp_path):
    secret_img, secret_txt = tmp_path / "elsewhere.jpg", tmp_path / "elsewhere.txt"
    secret_img.write_bytes(jpeg_bytes(radiograph(220, 200)))
    secret_txt.write_text("\n IMPRESSION: SECRET TEXT FROM OUTSIDE.\n", encoding="utf-8")
    root = tmp_path / "2.0.0"
    inside = root / "files" / "shared.jpg"
    inside.parent.mkdir(parents=True)
    inside.write_bytes(jpeg_bytes(radiograph(210, 190)))
    ids = mini_mimic(
        root,
        n=5,
        images={0: lambda p: p.symlink_to(secret_img), 2: lambda p: p.symlink_to(inside)},
        reports={1: lambda p: p.symlink_to(secret_txt)},
    )
    m = pack(root, tmp_path / "out")
    why = rejected_by_key(m)
    assert set(why) == {ids[0], ids[1]}
    assert "outside the dataset root" in why[ids[0]] and str(secret_img) in why[ids[0]]
    assert "outside the dataset root" in why[ids[1]] and str(secret_txt) in why[ids[1]]
    assert m["num_samples"] == 3  # a link that stays inside is fine
    blob = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*.tar"))
    assert b"SECRET" not in blob


def test_master_csv_path_escaping_the_root_is_refused(tmp_path):
    root = tmp_path / "2.0.0"
    ids = mini_mimic(root, n=3)
    (tmp_path / "loot.jpg").write_bytes(jpeg_bytes(radiograph(200, 200)))
    rows = [
        [
            "2.0.0/files/../../loot.jpg" if i == 0 else f"2.0.0/files/p10/p{10000000 + i}/s{50000000 + i}/{d}.jpg",
            d,
            f"{10000000 + i}",
            f"s{50000000 + i}",
            "PA",
            "Normal.",
            "Clear.",
            "train",
        ]
        for i, d in enumerate(ids)
    ]
    _write_csv(
        tmp_path / "master.csv",
        ["Path", "dicom_id", "subject_id", "study_id", "ViewPosition", "impression", "findings", "split"],
        rows,
    )
    m = pack(root, tmp_path / "out", master_csv=tmp_path / "master.csv")
    assert "outside the dataset root" in rejected_by_key(m)[ids[0]] and m["num_samples"] == 2


@pytest.fixture(scope="module")
def cxr14_src(tmp_path_factory):
    src = tmp_path_factory.mktemp("cxr14")
    write_all(src, 10, 0, datasets=("chestxray14",))
    return src / "chestxray14"


def test_chestxray14_follows_folder_links_inside_the_root_and_says_where_it_looked(cxr14_src, tmp_path):
    n_images = len(list((cxr14_src / "images_001" / "images").glob("*.png")))
    # images_001 assembled from a folder elsewhere inside the root, plus a link back up (no loop).
    src = tmp_path / "inside"
    shutil.copytree(cxr14_src, src)
    (src / "store").mkdir()
    (src / "images_001").rename(src / "store" / "images_001")
    (src / "images_001").symlink_to(src / "store" / "images_001", target_is_directory=True)
    (src / "store" / "images_001" / "loop").symlink_to(src, target_is_directory=True)
    m = convert("chestxray14", src, tmp_path / "o1", workers=1, samples_per_shard=4, progress=False)
    assert m["num_samples"] == n_images and m["summary"]["rejected"] == 0
    # A folder link leading out of the root is not entered; the rejection names where it looked.
    src2 = tmp_path / "outside"
    shutil.copytree(cxr14_src, src2, ignore=shutil.ignore_patterns("images_001"))
    (src2 / "images_001").symlink_to(cxr14_src / "images_001", target_is_directory=True)
    m2 = convert("chestxray14", src2, tmp_path / "o2", workers=1, samples_per_shard=4, progress=False)
    assert m2["num_samples"] == 0 and len(m2["rejected"]) == n_images
    assert all(f"no such PNG under {src2}" in r["reason"] for r in m2["rejected"])


def test_downstream_image_file_symlinked_out_of_the_root_is_refused(cxr14_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(cxr14_src, src)
    victim = sorted((src / "images_001" / "images").glob("*.png"))[0]
    outside = tmp_path / "outside.png"
    shutil.move(victim, outside)
    victim.symlink_to(outside)
    m = convert("chestxray14", src, tmp_path / "o", workers=1, samples_per_shard=4, progress=False)
    reasons = [r["reason"] for r in m["rejected"]]
    assert len(reasons) == 1 and "outside the dataset root" in reasons[0] and str(outside) in reasons[0]


# ---------------------------------------------------------------------------------------------
# 5. Bounds: report size, minimum side, maximum pixel count (checked before decoding)


def _png_header_only(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header claims `width` x `height` (8-bit gray); its pixel data is absent."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def test_size_bounds_are_recorded_rejections(tmp_path):
    big_report = "\n IMPRESSION: " + "Normal chest. " * 6000 + "\n"  # ~84 KB > 64 KiB default
    root = tmp_path / "2.0.0"
    ids = mini_mimic(
        root,
        n=6,
        images={
            1: jpeg_bytes(np.full((1, 1), 128, np.uint8)),
            2: _png_header_only(60000, 60000),
            3: _png_header_only(8000, 8000),
        },
        reports={0: big_report},
    )
    m = pack(root, tmp_path / "out")
    why = rejected_by_key(m)
    assert why[ids[0]].startswith("report too large: ") and "max_report_bytes 65536" in why[ids[0]]
    assert why[ids[1]] == "image too small: 1x1, a side < min_side 32"
    assert why[ids[2]].startswith("image too large: ")
    assert why[ids[3]] == "image too large: 8000x8000 = 64000000 pixels > max_pixels 50000000"
    assert m["num_samples"] == 2 and m["config"]["max_pixels"] == 50_000_000
    # The limits are parameters.
    why2 = rejected_by_key(pack(root, tmp_path / "out2", min_side=185))  # ids[4] is 180+4 px wide
    assert why2[ids[4]] == "image too small: 184x204, a side < min_side 185"
    assert why2[ids[5]].startswith("image content too small: the non-black area is 16")  # 185 - border
    why3 = rejected_by_key(pack(root, tmp_path / "out3", max_report_bytes=40))
    assert all("report too large" in why3[k] and "max_report_bytes 40" in why3[k] for k in ids[4:])
    with pytest.raises(ImageRejected, match="min_side 300"):
        decode_gray(jpeg_bytes(radiograph(250, 400)), limits=ImageLimits(min_side=300))
    # A black frame with a few bright pixels: big enough, but its content would be a 3-px image.
    speck = np.zeros((300, 300), np.uint8)
    speck[100:103, 150:153] = 200
    with pytest.raises(ImageRejected, match=r"content too small: the non-black area is \d+x\d+"):
        reduce_image_bytes(jpeg_bytes(speck, quality=100), 256)


# ---------------------------------------------------------------------------------------------
# 6. Hygiene: umask, temp files of killed writers, manifest size and stability, orig_size


def test_output_files_honour_the_umask(tmp_path, packed):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
        os.umask(0o022)
        atomic_write_text(tmp_path / "b.txt", "x")
        assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o644
        m = pack(packed["root"], tmp_path / "out")
    finally:
        os.umask(old)
    for name in (
        "manifest.json",
        "master.csv",
        m["splits"]["train"]["shards"][0]["name"],
        m["splits"]["train"]["shards"][0]["index"],
    ):
        assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o644, name


def test_temp_files_of_a_killed_packer_are_removed_on_the_next_run(packed, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(packed["out"], out)
    leftovers = [
        out / "train" / ".train-000000.tar.k1ll3d.tmp",
        out / ".manifest.json.abc123.tmp",
        out / ".master.csv.zz.tmp",
    ]
    for path in leftovers:
        path.write_bytes(b"partial")
    keep = out / "train" / "notes.tmp"  # not a temp file of ours: kept
    keep.write_text("mine")
    m = pack(packed["root"], out)
    assert not any(p.exists() for p in leftovers) and keep.exists()
    assert m["num_samples"] == len(packed["ids"])


def test_manifest_stores_each_rejection_once_and_is_byte_stable(tmp_path):
    root = tmp_path / "2.0.0"
    ids = mini_mimic(root, n=6, images={1: b"GIF89a not really", 4: b""})
    m = pack(root, tmp_path / "a")
    text = (tmp_path / "a" / "manifest.json").read_text()
    assert text.count(f'"key": "{ids[1]}"') == 1 and text.count(f'"key": "{ids[4]}"') == 1
    assert sum(rec["num_rejected"] for rec in m["_shard_records"]) == 2
    pack(root, tmp_path / "b")
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    # A rerun that keeps every shard keeps their rejections, still once each.
    pack(root, tmp_path / "a")
    assert (tmp_path / "a" / "manifest.json").read_text() == text


def test_downstream_reasons_carry_no_object_addresses(tmp_path):
    src = tmp_path / "src"
    write_all(src, 8, 0, datasets=("covidx",))
    bad = sorted((src / "covidx" / "train").iterdir())[0]
    bad.write_bytes(b"this is not an image at all")
    runs = [
        convert("covidx", src / "covidx", tmp_path / f"o{i}", workers=1, samples_per_shard=4, progress=False)
        for i in range(2)
    ]
    reasons = [r["reason"] for r in runs[0]["rejected"]]
    assert len(reasons) == 1 and "cannot identify image file" in reasons[0] and " at 0x" not in reasons[0]
    assert (tmp_path / "o0" / "covidx" / "manifest.json").read_bytes() == (
        tmp_path / "o1" / "covidx" / "manifest.json"
    ).read_bytes()


def test_orig_size_is_the_true_source_size_on_the_draft_path():
    data = jpeg_bytes(radiograph(1225, 1632))
    red = reduce_image_bytes(data, 256)
    assert red.orig_size == [1632, 1225]
    with Image.open(io.BytesIO(data)) as img:
        img.draft("L", (256, 193))
        assert img.size != (1632, 1225)  # the draft path was taken
    full = reduce_image_bytes(data, 256 * 8)  # no draft: the reference geometry
    assert all(abs(a - b) <= 8 for a, b in zip(red.crop_box, full.crop_box))
    assert red.crop_box[2] <= 1632 and red.crop_box[3] <= 1225
    sx, sy = red.scale
    assert abs((red.crop_box[2] - red.crop_box[0]) * sx - red.stored_size[0]) < 4
    assert abs((red.crop_box[3] - red.crop_box[1]) * sy - red.stored_size[1]) < 4


# ---------------------------------------------------------------------------------------------
# 7. Entry points: one `error:` line and exit 2 for user errors; nothing packed is an error


def test_pack_downstream_fails_when_nothing_was_packed(tmp_path, capsys):
    src = tmp_path / "src"
    write_all(src, 6, 0, datasets=("covidx",))
    for image in (src / "covidx").glob("*/*"):
        if image.suffix in (".png", ".jpg", ".jpeg"):
            image.unlink()
    code, err = cli(
        pack_downstream.main,
        ["--dataset", "covidx", "--src", str(src / "covidx"), "--out", str(tmp_path / "o"), "--workers", "1"],
        capsys,
    )
    assert_one_error_line(
        code,
        err,
        "nothing packed",
        "image file not found: looked for",
        str(tmp_path / "o" / "covidx" / "manifest.json"),
    )


@pytest.mark.parametrize(
    "tool,argv,needles",
    [
        (pack_shards, ["--mimic", "{tmp}/nope", "--out", "{tmp}/o"], ["MIMIC-CXR-JPG root not found", "nope"]),
        (pack_shards, ["--mimic", "{root}", "--out", "{tmp}/o", "--workers", "0"], ["workers=0"]),
        (
            pack_shards,
            ["--mimic", "{root}", "--out", "{tmp}/o", "--quality", "101", "--max-side", "0"],
            ["quality=101", "max_side=0"],
        ),
        (pack_shards, ["--mimic", "{root}", "--out", "{tmp}/o", "--workers", "many"], ["invalid int value: 'many'"]),
        (pack_shards, ["--out", "{tmp}/o"], ["one of the arguments --mimic --synthetic is required"]),
        (
            pack_shards,
            ["--mimic", "{root}", "--reports", "{tmp}/noreports", "--out", "{tmp}/o"],
            ["reports directory not found", "noreports"],
        ),
        (
            pack_shards,
            ["--mimic", "{root}", "--master-csv", "{tmp}/m.csv", "--out", "{tmp}/o"],
            ["master csv not found"],
        ),
        (
            pack_shards,
            ["--mimic", "{root}", "--out", "{root}/mimic-cxr-2.0.0-split.csv"],
            ["exists and is not a directory"],
        ),
        (pack_shards, ["--synthetic", "{root}/files", "--out", "{tmp}/o"], ["not a synthetic corpus", "refusing"]),
        (
            pack_downstream,
            ["--dataset", "rsna_pneumonia", "--src", "{tmp}/nope", "--out", "{tmp}/o"],
            ["source directory", "nope"],
        ),
        (pack_downstream, ["--dataset", "mnist", "--src", "{tmp}", "--out", "{tmp}/o"], ["invalid choice: 'mnist'"]),
        (
            pack_downstream,
            ["--dataset", "covidx", "--src", "{tmp}/covidx", "--out", "{tmp}/o"],
            ["covidx/train_COVIDx9A.txt: file not found"],
        ),
        (
            pack_downstream,
            ["--dataset", "covidx", "--src", "{tmp}", "--out", "{tmp}/o", "--samples-per-shard", "0"],
            ["samples_per_shard=0"],
        ),
        (pack_downstream, ["--dataset", "covidx", "--src", "{tmp}/covidx", "--out", "{tmp}"], ["is inside the source"]),
        (verify_shards, ["{tmp}/nope"], ["no packed dataset at", "nope"]),
        (verify_shards, ["{tmp}"], ["no shard manifest at"]),
        (verify_shards, ["{root}", "--workers", "-1"], ["--workers -1"]),
        (synth_mimic, ["--out", "{tmp}/s", "--n", "2", "--size", "5"], ["size 5 outside 64..3000"]),
        (synth_mimic, ["--out", "{tmp}/s", "--n", "0"], ["n must be >= 1"]),
        (synth_mimic, ["--out", "{tmp}/s", "--n", "1", "--workers", "0"], ["workers must be >= 1"]),
        (synth_downstream, ["--out", "{tmp}/s", "--n", "0"], ["--n 0"]),
        (synth_downstream, ["--out", "{tmp}/s", "--datasets", "bogus"], ["invalid choice: 'bogus'"]),
    ],
)
def test_data_entry_points_turn_user_errors_into_one_line(tool, argv, needles, packed, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, root=packed["root"]) for a in argv]
    (tmp_path / "covidx").mkdir()
    code, err = cli(tool.main, argv, capsys)
    assert_one_error_line(code, err, *needles)


def test_missing_csv_or_column_is_one_line_and_debug_shows_the_traceback(packed, tmp_path, capsys):
    root = tmp_path / "2.0.0"
    shutil.copytree(packed["root"], root)
    (root / "mimic-cxr-2.0.0-split.csv").write_text("dicom_id,study_id,subject_id\n", encoding="utf-8")
    args = ["--mimic", str(root), "--out", str(tmp_path / "o"), "--workers", "1"]
    code, err = cli(pack_shards.main, args, capsys)
    assert_one_error_line(code, err, "mimic-cxr-2.0.0-split.csv", "missing column(s) ['split']")
    (root / "mimic-cxr-2.0.0-metadata.csv").unlink()
    code, err = cli(pack_shards.main, args, capsys)
    assert_one_error_line(code, err, "missing mimic-cxr-2.0.0-metadata.csv")
    # The same error as `python -m` prints it, and with --debug the traceback.
    run = subprocess.run(
        [sys.executable, "-m", "tools.pack_shards", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 2 and run.stderr.startswith("error: missing mimic-cxr-2.0.0-metadata.csv")
    assert "Traceback" not in run.stderr
    debug = subprocess.run(
        [sys.executable, "-m", "tools.pack_shards", *args, "--debug"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_verify_exit_status_separates_damaged_shards_from_user_errors(packed, tmp_path, capsys):
    out = tmp_path / "bad"
    shutil.copytree(packed["out"], out)
    name = packed["manifest"]["splits"]["train"]["shards"][0]["name"]
    (out / name).write_bytes((out / name).read_bytes()[:-1024])
    code, err = cli(verify_shards.main, [str(out), "--workers", "1"], capsys)
    assert code == 1 and f"FAILED: {name}" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# 8. More hostile and clumsy inputs


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("empty metadata csv", b"", r"missing column\(s\) \['dicom_id'"),
        ("short row", b"dicom_id,subject_id,study_id,ViewPosition\nx1,10000000\n", r"line 2: row has no value"),
        ("not UTF-8", b"dicom_id,subject_id,study_id,ViewPosition\n\xff\xfe,1,2,PA\n", "not a readable UTF-8 csv"),
        (
            "subject not a number",
            b"dicom_id,subject_id,study_id,ViewPosition\nx1,p1O,50000000,PA\n",
            "subject_id 'p1O' is not a number",
        ),
    ],
)
def test_broken_metadata_csv_fails_naming_file_and_line(name, content, match, packed, tmp_path):
    root = tmp_path / "2.0.0"
    shutil.copytree(packed["root"], root)
    (root / "mimic-cxr-2.0.0-metadata.csv").write_bytes(content)
    with pytest.raises(ValueError, match=match) as exc:
        pack(root, tmp_path / "o")
    assert "mimic-cxr-2.0.0-metadata.csv" in str(exc.value)


def test_damaged_gz_csv_fails_naming_it(packed, tmp_path):
    root = tmp_path / "2.0.0"
    shutil.copytree(packed["root"], root)
    meta = root / "mimic-cxr-2.0.0-metadata.csv"
    meta.with_suffix(".csv.gz").write_bytes(b"\x1f\x8b\x08\x00garbage-not-deflate")
    meta.unlink()
    with pytest.raises(ValueError, match="metadata.csv.gz: not a readable UTF-8 csv"):
        pack(root, tmp_path / "o")


def test_fifo_folder_and_odd_ids_named_like_images_are_rejected_without_hanging(tmp_path):
    root = tmp_path / "2.0.0"
    ids = mini_mimic(root, n=4, images={0: lambda p: os.mkfifo(p), 1: lambda p: p.mkdir()})
    meta = (root / "mimic-cxr-2.0.0-metadata.csv").read_text().replace(ids[2], "a.b", 1)
    (root / "mimic-cxr-2.0.0-metadata.csv").write_text(meta)
    (root / "mimic-cxr-2.0.0-split.csv").write_text(
        (root / "mimic-cxr-2.0.0-split.csv").read_text().replace(ids[2], "a.b", 1)
    )
    why = rejected_by_key(pack(root, tmp_path / "out"))
    assert why[ids[0]] == why[ids[1]] == "image path is not a regular file"
    assert "invalid sample key 'a.b'" in why["a.b"]


def test_odd_image_modes_are_converted_not_rejected():
    base = radiograph(120, 100)
    for mode, img in {
        "RGB": Image.fromarray(base).convert("RGB"),
        "P": Image.fromarray(base).convert("P"),
        "F": Image.fromarray(base.astype(np.float32) * 3.5),
        "I": Image.fromarray(base.astype(np.int32) * 1000),
    }.items():
        buf = io.BytesIO()
        img.save(buf, format="TIFF" if mode in ("F", "I") else "PNG")
        decoded = decode_gray(buf.getvalue())
        assert decoded.gray.shape == (120, 100) and decoded.gray.dtype == np.uint8, mode
        assert decoded.window == ("percentile" if mode in ("F", "I") else ""), mode
        assert np.corrcoef(decoded.gray.ravel(), base.ravel())[0, 1] > 0.99, mode


def test_dicom_claiming_huge_dimensions_is_rejected_before_decoding(tmp_path):
    path = tmp_path / "x.dcm"
    write_dicom(path, radiograph(64, 64), patient_id="P1", sop_uid="1.2.3.4")
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 60000  # the header lies; the pixel data is 4 KB
    ds.save_as(path)
    with pytest.raises(DicomError, match="image too large: 60000x60000"):
        read_dicom(path, ImageLimits())


def test_verify_names_a_manifest_field_that_is_missing(packed, tmp_path):
    out = tmp_path / "m"
    shutil.copytree(packed["out"], out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["splits"]["train"]["shards"][0]["sha256"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match=r"split 'train' shard 0: field\(s\) \['sha256'\] missing"):
        verify_dataset(out)
    assert read_manifest(out)["num_samples"] == packed["manifest"]["num_samples"]


@pytest.mark.parametrize("damage", ["[1, 2]", "{not json", '{"config": null}', "RECORDS"])
def test_a_damaged_previous_manifest_only_costs_a_rebuild(damage, packed, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(packed["out"], out)
    if damage == "RECORDS":  # same config, broken bookkeeping
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["_shard_records"] = [{"name": 3}, "x", {**manifest["_shard_records"][0], "num_items": "2"}]
        damage = json.dumps(manifest)
    (out / "manifest.json").write_text(damage)
    m = pack(packed["root"], out)
    assert m["num_samples"] == len(packed["ids"]) and verify_dataset(out)["num_samples"] == m["num_samples"]
    assert (out / "manifest.json").read_bytes() == (packed["out"] / "manifest.json").read_bytes()


def test_a_symlinked_files_folder_is_a_legitimate_mimic_layout(tmp_path):
    root = tmp_path / "2.0.0"
    ids = mini_mimic(root, n=4)
    (root / "files").rename(tmp_path / "big_disk_files")
    (root / "files").symlink_to(tmp_path / "big_disk_files", target_is_directory=True)
    m = pack(root, tmp_path / "out")
    assert m["num_samples"] == len(ids) and m["rejected"] == []


def test_synth_removes_the_temp_tree_of_a_killed_generator_only(tmp_path):
    from shards.synthetic.mimic import generate_mimic

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    killed = tmp_path / f".corpus.tmp-{dead}"
    live = tmp_path / f".corpus.tmp-{os.getpid()}x"  # not ours to judge: kept
    running = tmp_path / f".corpus.old-{os.getppid()}"  # its writer is alive: kept
    for tree in (killed, live, running):
        (tree / "files").mkdir(parents=True)
    generate_mimic(tmp_path / "corpus", n=1, seed=0, size=64, workers=1)
    assert not killed.exists() and live.exists() and running.exists()
    assert (tmp_path / "corpus" / "mimic-cxr-2.0.0-metadata.csv").is_file()


SLOW_PACK = (
    "import sys, time\nimport shards.mimic as m\norig = m.build_sample\n"
    "def slow(*a, **k):\n    time.sleep(0.03)\n    return orig(*a, **k)\n"
    "m.build_sample = slow\n"
    "m.pack_mimic(sys.argv[1], sys.argv[2], m.PackOptions(samples_per_shard=2, workers=1, seed=0), progress=False)\n"
)


def test_packer_killed_mid_run_then_rerun_gives_the_uninterrupted_bytes(tmp_path):
    root = tmp_path / "2.0.0"
    mini_mimic(root, n=24)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_PACK, str(root), str(out)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}
    )
    try:
        deadline = time.monotonic() + 60
        while len(list((out / "train").glob("*.tar"))) < 3 and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.kill()
    finally:
        proc.wait()
    assert proc.returncode == -9 and not (out / "manifest.json").exists()  # killed mid-run
    pack(root, out, samples_per_shard=2)
    pack(root, tmp_path / "clean", samples_per_shard=2)

    def tree(d: Path) -> dict[str, bytes]:
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    assert tree(out) == tree(tmp_path / "clean") and verify_dataset(out)["num_samples"] == 24
