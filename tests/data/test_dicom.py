import numpy as np
import pytest

from cxrkit.data.dicom import read_dicom
from cxrkit.data.images import decode_image_bytes, read_image
from cxrkit.errors import CxrError

from .helpers import write_dicom

RAMP = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)


def _read(path) -> np.ndarray:
    im = read_image(path)
    assert im.mode == "L"
    return np.asarray(im)


def test_monochrome2_is_scaled_by_min_and_max(tmp_path):
    out = _read(write_dicom(tmp_path / "a.dcm", RAMP))
    assert out.shape == (64, 64)
    np.testing.assert_array_equal(out, np.rint(RAMP / 4095 * 255).astype(np.uint8))


def test_monochrome1_gives_the_same_pixels_as_monochrome2(tmp_path):
    mono2 = _read(write_dicom(tmp_path / "m2.dcm", RAMP, "MONOCHROME2"))
    mono1 = _read(write_dicom(tmp_path / "m1.dcm", (4095 - RAMP).astype(np.uint16), "MONOCHROME1"))
    np.testing.assert_array_equal(mono1, mono2)
    assert mono1[0, 0] == 0  # the lowest MONOCHROME2 value (brightest MONOCHROME1 value inverted) is black


def test_window_center_and_width(tmp_path):
    out = _read(write_dicom(tmp_path / "w.dcm", RAMP, WindowCenter=1000, WindowWidth=200)).ravel()
    assert out[:900].max() == 0  # below the window: black
    assert out[1100:4096].min() == 255  # above the window: white
    assert 120 <= out[1000] <= 135  # the centre is mid-gray
    assert np.all(np.diff(out[900:1100].astype(int)) >= 0)


def test_modality_lut_is_applied_before_the_window(tmp_path):
    # stored 0..4095 with slope 1, intercept -1024 -> -1024..3071 HU; a window of 0 +- 100 HU
    windowed = _read(
        write_dicom(tmp_path / "hu.dcm", RAMP, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=0, WindowWidth=200)
    ).ravel()
    assert windowed[:900].max() == 0 and windowed[1150:4096].min() == 255
    assert 120 <= windowed[1024] <= 135


def test_signed_pixels(tmp_path):
    pixels = np.linspace(-1000, 1000, 16 * 16).reshape(16, 16).astype(np.int16)
    out = _read(write_dicom(tmp_path / "s.dcm", pixels))
    assert out[0, 0] == 0 and out[-1, -1] == 255


def test_read_dicom_from_bytes_and_path_agree(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", RAMP)
    from_bytes = np.asarray(read_dicom(path.read_bytes(), "upload.dcm"))
    np.testing.assert_array_equal(from_bytes, np.asarray(read_dicom(path)))
    np.testing.assert_array_equal(from_bytes, np.asarray(decode_image_bytes(path.read_bytes(), "u.dcm")))


def test_multiframe_is_refused(tmp_path):
    path = write_dicom(tmp_path / "multi.dcm", np.stack([RAMP, RAMP]), NumberOfFrames=2)
    with pytest.raises(CxrError, match=r"multi\.dcm: multi-frame DICOM \(2 frames\)"):
        read_image(path)


def test_truncated_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "full.dcm", RAMP)
    data = path.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 3000])
    with pytest.raises(CxrError, match=r"cut\.dcm: cannot decode DICOM pixel data \(Explicit VR Little Endian, "
                                       r"transfer syntax 1\.2\.840\.10008\.1\.2\.1; damaged data\)"):
        read_image(tmp_path / "cut.dcm")


def test_undecodable_compressed_pixel_data_names_its_encoding(tmp_path):
    """pydicom's own words ("all available plugins: pillow: cannot identify image file") did not say which encoding
    or what to do about it."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    ds = pydicom.dcmread(write_dicom(tmp_path / "j2k.dcm", RAMP))
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(200)])  # a JPEG 2000 marker, then garbage
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "j2k.dcm", enforce_file_format=True)
    with pytest.raises(CxrError, match=r"j2k\.dcm: cannot decode DICOM pixel data \(JPEG 2000 Image Compression "
                                       r"\(Lossless Only\), transfer syntax 1\.2\.840\.10008\.1\.2\.4\.90; damaged "
                                       r"compressed data, or no decoder for it installed\)"):
        read_image(tmp_path / "j2k.dcm")


def test_truncated_header(tmp_path):
    data = write_dicom(tmp_path / "full.dcm", RAMP).read_bytes()
    (tmp_path / "head.dcm").write_bytes(data[:200])
    with pytest.raises(CxrError, match=r"head\.dcm: "):
        read_image(tmp_path / "head.dcm")


def test_no_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "nopix.dcm", RAMP)
    import pydicom

    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(CxrError, match=r"nopix\.dcm: DICOM file has no pixel data \(cut short"):
        read_image(path)


def test_oversized_dicom_is_refused_before_decoding(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", RAMP)
    with pytest.raises(CxrError, match="over the limit"):
        read_image(path, max_pixels=1000)


def test_text_named_dcm_is_not_dicom(tmp_path):
    (tmp_path / "notes.dcm").write_text("not a dicom file at all\n" * 10)
    with pytest.raises(CxrError, match=r"notes\.dcm: not a DICOM file"):
        read_image(tmp_path / "notes.dcm")


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about each damaged value it meets
def test_damaged_files_only_ever_raise_one_line_errors(tmp_path):
    """pydicom parses lazily and raises many types (BytesLengthException, NotImplementedError, struct.error...):
    every cut and every flipped header byte must come out as a CxrError naming the file, on one line."""
    data = write_dicom(tmp_path / "full.dcm", RAMP).read_bytes()
    header = len(data) - RAMP.size * 2
    damaged = [data[:cut] for cut in range(132, header + 16)]
    for pos in range(132, header):
        flipped = bytearray(data)
        flipped[pos] ^= 0xFF
        damaged.append(bytes(flipped))
    failures = 0
    for blob in damaged:
        try:
            decode_image_bytes(blob, "scan.dcm")
        except CxrError as err:
            failures += 1
            assert str(err).startswith("scan.dcm: ") and "\n" not in str(err) and " at 0x" not in str(err)
    assert failures > len(damaged) // 2  # most of them are refused, none with another exception type


def test_a_lut_shorter_than_its_descriptor_is_an_invalid_lut(tmp_path):
    from pydicom.dataset import Dataset

    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]
    lut.LUTData = b"\x00\x01" * 10  # 10 entries where 4096 are announced
    path = write_dicom(tmp_path / "voi.dcm", RAMP, VOILUTSequence=[lut])
    with pytest.raises(CxrError, match=r"voi\.dcm: invalid DICOM LUT or window attributes"):
        read_image(path)


@pytest.mark.parametrize("implicit", [True, False])
def test_a_dataset_without_file_meta_is_read_by_its_encoding(tmp_path, implicit):
    import io

    import pydicom

    path = write_dicom(tmp_path / "full.dcm", RAMP)
    ds = pydicom.dcmread(path)
    ds.preamble, ds.file_meta = None, pydicom.dataset.FileMetaDataset()  # raw export: no preamble, no meta
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=implicit, little_endian=True, enforce_file_format=False)
    np.testing.assert_array_equal(np.asarray(decode_image_bytes(buffer.getvalue(), "raw.dcm")), _read(path))
