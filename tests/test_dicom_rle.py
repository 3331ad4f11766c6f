"""DICOM reading (windows, photometric, transfer syntaxes, bad files), SIIM RLE, and geometry:
a box drawn into a DICOM lands on the same stored pixels as its transformed coordinates and mask."""

import io
import json

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import JPEGBaseline8Bit, JPEGLosslessSV1, RLELossless

from shards.dicom import DicomError, read_dicom, read_patient_id, rle_decode, rle_encode
from shards.downstream.common import Item, SampleBuilder
from shards.synthetic.downstream import write_dicom
from shards.writer import PackedSample, Rejected

# [H=3, W=4] mask. Column-major flat index = x * H + y: column 1 holds pixels 3, 4 and column 3
# pixels 10, 11 -> runs (3, 2) and (10, 2) -> relative "3 2 5 2". Row-major would read "1 1 3 1 1 1 3 1".
HAND_MASK = np.array([[0, 1, 0, 0], [0, 1, 0, 1], [0, 0, 0, 1]], dtype=bool)
HAND_RLE = "3 2 5 2"


def test_rle_matches_hand_computed_column_major_string():
    assert rle_encode(HAND_MASK) == HAND_RLE
    np.testing.assert_array_equal(rle_decode(HAND_RLE, width=4, height=3), HAND_MASK)
    # The same numbers read row-major would be a different mask: the order matters.
    assert rle_encode(HAND_MASK.T.copy()) != HAND_RLE


def test_rle_round_trip_and_edges():
    rng = np.random.default_rng(0)
    mask = np.zeros((48, 64), dtype=bool)
    mask[5:20, 10:30] = True
    mask[30:47, 50:64] = True  # touches the last column and near-last row
    mask |= rng.random(mask.shape) < 0.02
    mask[0, 0] = mask[-1, -1] = True  # first and last pixel: offset 0, run to the end
    np.testing.assert_array_equal(rle_decode(rle_encode(mask), 64, 48), mask)
    assert rle_encode(np.zeros((4, 4), bool)) == ""
    assert rle_encode(np.ones((2, 3), bool)) == "0 6"


@pytest.mark.parametrize(
    "bad, why",
    [
        ("3 2 5", "odd number"),
        ("3 2 5 x", "non-integer"),
        ("3 2 -5 2", "offset must be"),
        ("3 0", "length > 0"),
        ("3 2 5 3", "past the 4x3 image"),
        ("   ", "empty"),
    ],
)
def test_rle_rejects_malformed(bad, why):
    with pytest.raises(ValueError, match=why):
        rle_decode(bad, width=4, height=3)


def _gray(h=96, w=80):
    yy, xx = np.mgrid[0:h, 0:w]
    return ((xx * 3 + yy * 2) % 250 + 3).astype(np.uint8)  # no zero pixels: no crop


@pytest.mark.parametrize(
    "encoding, window",
    [
        ("mono2", "identity"),
        ("mono1", "identity"),
        ("12bit_window", "window"),
    ],
)
@pytest.mark.parametrize("syntax", [None, RLELossless])
def test_read_dicom_recovers_the_display_image(tmp_path, encoding, window, syntax):
    gray = _gray()
    path = tmp_path / "a.dcm"
    kw = {"transfer_syntax": syntax} if syntax else {}
    write_dicom(path, gray, patient_id="P1", sop_uid="1.2.3.4", encoding=encoding, **kw)
    out = read_dicom(path)
    assert out.window == window and out.patient_id == "P1"
    np.testing.assert_array_equal(out.gray, gray)
    assert read_patient_id(path) == "P1"


def test_12bit_without_window_uses_percentiles_and_inverts_monochrome1(tmp_path):
    gray = _gray()
    write_dicom(tmp_path / "a.dcm", gray, patient_id="P", sop_uid="1.2.3", encoding="12bit")
    out = read_dicom(tmp_path / "a.dcm")
    assert out.window == "percentile" and out.photometric == "MONOCHROME1" and out.bits_stored == 12
    # Stored MONOCHROME1 -> inverted back: same order of brightness as the source, stretched.
    assert np.corrcoef(out.gray.ravel(), gray.ravel())[0, 1] > 0.99
    assert out.gray.min() == 0 and out.gray.max() == 255


def test_voi_lut_sequence_is_applied(tmp_path):
    gray = _gray()
    path = tmp_path / "a.dcm"
    write_dicom(path, gray, patient_id="P", sop_uid="1.2.3", encoding="mono2")
    ds = pydicom.dcmread(path)
    item = Dataset()
    item.add_new(0x00283002, "US", [256, 0, 8])  # LUT Descriptor
    item.add_new(0x00283006, "US", [255 - v for v in range(256)])  # LUT Data: inverting
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(path, enforce_file_format=True)
    out = read_dicom(path)
    assert out.window == "voi_lut"
    np.testing.assert_array_equal(out.gray, 255 - gray)


def test_jpeg_baseline_dicom_is_decoded(tmp_path):
    gray = _gray()
    write_dicom(tmp_path / "a.dcm", gray, patient_id="P", sop_uid="1.2.3", transfer_syntax=JPEGBaseline8Bit)
    out = read_dicom(tmp_path / "a.dcm")
    assert out.transfer_syntax.startswith("JPEG Baseline")
    assert np.abs(out.gray.astype(int) - gray).mean() < 3


def test_bad_dicoms_raise_clear_errors(tmp_path):
    with pytest.raises(DicomError, match="not found"):
        read_dicom(tmp_path / "missing.dcm")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not a dicom file" * 10)
    with pytest.raises(DicomError, match="unreadable DICOM"):
        read_dicom(junk)
    # A transfer syntax no installed handler decodes: the error names it.
    path = tmp_path / "lossless.dcm"
    write_dicom(path, _gray(), patient_id="P", sop_uid="1.2.3")
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([b"\xff\xd8 not really jpeg \xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomError, match="unsupported transfer syntax JPEG Lossless"):
        read_dicom(path)
    ds.file_meta.TransferSyntaxUID = "1.2.3.999.1"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DicomError, match=r"unsupported transfer syntax .*1\.2\.3\.999\.1"):
        read_dicom(path)


def _decode(members, ext):
    return np.asarray(Image.open(io.BytesIO(members[ext])))


def test_box_follows_the_image_through_crop_and_resize(tmp_path):
    """A bright rectangle drawn in a DICOM with a black frame (cropped away) and shrunk 1024 -> 256:
    its stored pixels, the transformed box and the rasterised mask agree."""
    h = w = 1024
    gray = np.zeros((h, w), np.uint8)
    gray[64:1000, 100:980] = 60  # body; zero frame gets cropped
    x1, y1, x2, y2 = 300, 420, 560, 700
    gray[y1:y2, x1:x2] = 250  # the "finding"
    path = tmp_path / "p.dcm"
    write_dicom(path, gray, patient_id="P", sop_uid="1.2.3")
    item = Item(
        key="p",
        source=str(path),
        rel="p.dcm",
        reader="dicom",
        order=0,
        patient_id="P",
        labels={"Pneumonia": 1.0},
        boxes=[[x1, y1, x2, y2]],
        mask="boxes",
        positive=True,
    )
    out = SampleBuilder("rsna_pneumonia", max_side=256, quality=95, with_mask=True)(item)
    assert isinstance(out, PackedSample)
    meta = json.loads(out.members["json"])
    assert meta["crop_box"] == [100, 64, 980, 1000]
    sx, sy = meta["scale"]
    assert max(meta["stored_size"]) == 256 and meta["orig_size"] == [1024, 1024]
    stored = _decode(out.members, "jpg")
    ys, xs = np.nonzero(stored > 155)  # bright rectangle in the stored jpg
    seen = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    box = meta["boxes"][0]
    expected = [(x1 - 100) * sx, (y1 - 64) * sy, (x2 - 100) * sx, (y2 - 64) * sy]
    np.testing.assert_allclose(box, expected, atol=0.01)
    np.testing.assert_allclose(seen, box, atol=1.0)
    mask = _decode(out.members, "png") > 0
    assert mask.shape == stored.shape
    bright = stored > 155
    assert (mask & bright).sum() / (mask | bright).sum() > 0.95


def test_sample_builder_rejections(tmp_path):
    path = tmp_path / "p.dcm"
    write_dicom(path, _gray(64, 64), patient_id="P", sop_uid="1.2.3")
    base = dict(key="p", source=str(path), rel="p.dcm", reader="dicom", order=0, patient_id="P", labels={"x": 1.0})
    build = SampleBuilder("t", max_side=64, quality=90, with_mask=True)
    cases = [
        (Item(**{**base, "source": str(tmp_path / "nope.dcm")}), "not found"),
        (Item(**base, boxes=[[10, 10, 10, 20]], mask="boxes"), "non-positive size"),
        (Item(**base, boxes=[[10, 10, 90, 20]], mask="boxes"), "outside the 64x64 image"),
        (Item(**base, mask="rle", rle=["1 2 3"]), "malformed RLE"),
        (Item(**base, mask="rle", rle=["4090 10"]), "past the 64x64 image"),
    ]
    for item, why in cases:
        out = build(item)
        assert isinstance(out, Rejected) and why in out.reason, (why, out)
    # A box a hair past the border (within tolerance) is clipped, not rejected.
    ok = build(Item(**base, boxes=[[10, 10, 64.4, 20]], mask="boxes"))
    assert isinstance(ok, PackedSample)
    assert json.loads(ok.members["json"])["boxes"][0][2] == 64
