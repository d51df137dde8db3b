import io
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile

from cxrkit.data.images import decode_image_bytes, header_problem, read_image, scale_to_uint8, sniff_format
from cxrkit.data.png import needed_bytes
from cxrkit.errors import CxrError

from .helpers import gray, png_first_rows, png_header_only, save_gray, write_dicom


def _header(path) -> Image.Image:
    with Image.open(path) as im:
        return im


def _pixels(im: Image.Image) -> np.ndarray:
    assert im.mode == "L"
    return np.asarray(im)


def test_8bit_grayscale_png_is_returned_unchanged(tmp_path):
    path = save_gray(tmp_path / "a.png", (32, 24))
    im = read_image(path)
    assert im.size == (32, 24)
    np.testing.assert_array_equal(_pixels(im), gray((32, 24)))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_is_scaled_by_its_own_min_and_max(tmp_path, suffix):
    values = np.linspace(1000, 5000, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / f"sixteen{suffix}"
    Image.fromarray(values).save(path)
    assert _header(path).mode.startswith("I;16")
    out = _pixels(read_image(path))
    assert out.min() == 0 and out.max() == 255
    expected = np.rint((values.astype(float) - 1000) / 4000 * 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


def test_32bit_float_tiff_is_scaled(tmp_path):
    values = np.linspace(-1.0, 3.0, 16 * 8).reshape(8, 16).astype(np.float32)
    Image.fromarray(values).save(tmp_path / "f.tif")
    out = _pixels(read_image(tmp_path / "f.tif"))
    assert out[0, 0] == 0 and out[-1, -1] == 255


@pytest.mark.parametrize(
    ("mode", "color", "expected"),
    [
        ("RGB", (255, 0, 0), 76),  # ITU-R 601 luma: 0.299 * 255
        ("RGB", (0, 255, 0), 150),
        ("RGBA", (0, 0, 255, 0), 29),  # alpha dropped, not composited: the blue still shows
        ("LA", (200, 10), 200),
        ("CMYK", (0, 0, 0, 0), 255),  # no ink is white
        ("CMYK", (255, 0, 0, 0), 179),  # cyan = RGB (0, 255, 255)
    ],
)
def test_colour_modes_become_grayscale(tmp_path, mode, color, expected):
    path = tmp_path / ("c.jpg" if mode == "CMYK" else "c.png")
    Image.new(mode, (8, 8), color).save(path)
    out = _pixels(read_image(path))
    assert abs(int(out.mean()) - expected) <= 2


def test_palette_image_uses_its_palette(tmp_path):
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 255, 255, 255] + [0, 0, 0] * 254)
    im.save(tmp_path / "p.png")
    assert _header(tmp_path / "p.png").mode == "P"
    assert _pixels(read_image(tmp_path / "p.png")).min() == 255


def test_exif_orientation_is_applied(tmp_path):
    im = Image.fromarray(gray((40, 20)))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    im.save(tmp_path / "rotated.jpeg", exif=exif.tobytes())
    assert _header(tmp_path / "rotated.jpeg").size == (40, 20)
    assert read_image(tmp_path / "rotated.jpeg").size == (20, 40)


@pytest.mark.parametrize("name", ["x.tif", "x.webp", "x.bmp", "x.jpg", "x.gif"])
def test_common_formats_decode(tmp_path, name):
    path = save_gray(tmp_path / name, (20, 10), **({"lossless": True} if name.endswith(".webp") else {}))
    im = read_image(path)
    assert im.mode == "L" and im.size == (20, 10)
    if name.endswith((".tif", ".bmp", ".gif", ".webp")):  # lossless here
        np.testing.assert_array_equal(np.asarray(im), gray((20, 10)))


def test_multiframe_gif_gives_first_frame(tmp_path):
    frames = [Image.new("L", (6, 6), v) for v in (10, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with Image.open(tmp_path / "anim.gif") as anim:
        assert anim.n_frames == 2
    assert _pixels(read_image(tmp_path / "anim.gif")).max() == 10


def test_format_is_sniffed_from_content_not_name(tmp_path):
    path = save_gray(tmp_path / "really_a_png.jpeg", (8, 8), fmt="PNG")
    np.testing.assert_array_equal(_pixels(read_image(path)), gray((8, 8)))
    assert sniff_format(path.read_bytes()[:132]) == "PNG"


def test_dicom_detected_by_magic_whatever_the_name(tmp_path):
    path = write_dicom(tmp_path / "scan.bin", np.arange(64, dtype=np.uint16).reshape(8, 8))
    out = _pixels(read_image(path))
    assert out[0, 0] == 0 and out[-1, -1] == 255


def test_decode_image_bytes_uses_the_given_name_in_errors():
    buf = io.BytesIO()
    Image.fromarray(gray((8, 8))).save(buf, "PNG")
    assert decode_image_bytes(buf.getvalue(), "upload.png").size == (8, 8)
    with pytest.raises(CxrError, match=r"^upload\.png: "):
        decode_image_bytes(b"hello", "upload.png")


def test_missing_file(tmp_path):
    with pytest.raises(CxrError, match=r"nope\.png: file does not exist"):
        read_image(tmp_path / "nope.png")


def test_empty_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(CxrError, match=r"empty\.png: empty file"):
        read_image(tmp_path / "empty.png")


def test_text_named_jpeg(tmp_path):
    (tmp_path / "notes.jpeg").write_text("this is not an image\n" * 20)
    with pytest.raises(CxrError, match=r"notes\.jpeg: not an image"):
        read_image(tmp_path / "notes.jpeg")


@pytest.mark.parametrize("head", [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"BM"])
def test_a_known_signature_with_a_broken_header_is_called_corrupt(head):
    with pytest.raises(CxrError, match=r"^scan: corrupt "):  # not "not an image": the signature is there
        decode_image_bytes(head + b"\x07" * 40, "scan")


def test_truncated_jpeg_fails_without_global_settings(tmp_path):
    path = save_gray(tmp_path / "full.jpeg", (256, 256))
    data = path.read_bytes()
    (tmp_path / "cut.jpeg").write_bytes(data[: len(data) // 2])
    with pytest.raises(CxrError, match=r"cut\.jpeg: corrupt or truncated"):
        read_image(tmp_path / "cut.jpeg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_png_whose_pixel_data_ends_cleanly_but_early_is_refused(tmp_path):
    """Its zlib stream is complete, so Pillow decoded it with the missing rows black and said nothing."""
    pixels = gray((32, 24)) | 1  # no black row of its own
    np.testing.assert_array_equal(_pixels(read_image(png_first_rows(tmp_path / "whole.png", pixels, 24))), pixels)
    with pytest.raises(CxrError, match=r"short\.png: corrupt or truncated image \(PNG pixel data ends early: 396 of "
                                       r"the 792 bytes a 32x24 image needs\)$"):
        read_image(png_first_rows(tmp_path / "short.png", pixels, 12))
    pixels[-2:] = 0  # an image that really ends in black rows is checked, and passes
    np.testing.assert_array_equal(_pixels(read_image(png_first_rows(tmp_path / "dark.png", pixels, 24))), pixels)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"])
@pytest.mark.parametrize("size", [(1, 1), (7, 3), (33, 10)])
def test_png_pixel_data_size_matches_what_pillow_writes(mode, size):
    import struct
    import zlib

    from cxrkit.data.png import _chunks

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    chunks = list(_chunks(buf.getvalue()))
    width, height, bit_depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1][:13])
    inflated = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert needed_bytes(width, height, bit_depth, colour_type, bool(interlace)) == len(inflated)


def test_interlaced_png_pixel_data_counts_every_adam7_pass():
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    for width, height in [(1, 1), (5, 3), (8, 8), (13, 29), (100, 7)]:
        for bits, colour_type in [(1, 0), (8, 0), (16, 2), (8, 6)]:  # bits per sample
            bits_per_pixel = bits * {0: 1, 2: 3, 6: 4}[colour_type]
            expected = 0
            for x0, y0, dx, dy in passes:  # count each pass's pixels one by one
                columns, rows = len(range(x0, width, dx)), len(range(y0, height, dy))
                if columns and rows:
                    expected += rows * (1 + (columns * bits_per_pixel + 7) // 8)
            assert needed_bytes(width, height, bits, colour_type, True) == expected


def test_decompression_bomb_is_refused_quickly(tmp_path):
    max_before = Image.MAX_IMAGE_PIXELS
    path = png_header_only(tmp_path / "bomb.png", 20000, 20000)
    assert path.stat().st_size < 200
    # Pillow refuses it before cxrkit's own check: its message quoted Pillow's limit, 178956970 pixels
    with pytest.raises(CxrError, match=r"^\S*bomb\.png: image too large \(400 megapixels\), over the limit of 64 "
                                       r"megapixels; a possible decompression bomb$"):
        read_image(path)
    assert header_problem(path, "PNG") == ("image too large (400 megapixels), over the limit of 64 megapixels; a "
                                           "possible decompression bomb")
    assert Image.MAX_IMAGE_PIXELS == max_before


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    big = png_header_only(tmp_path / "big.png", 9000, 9000)  # 81 MP: below Pillow's own limit, above ours
    with pytest.raises(CxrError, match=r"big\.png: image is 9000x9000 .* over the limit of 64 megapixels"):
        read_image(big)
    larger = png_header_only(tmp_path / "larger.png", 10000, 10000)  # 100 MP: Pillow warns, then ours refuses
    with warnings.catch_warnings(record=True) as caught:
        with pytest.raises(CxrError, match=r"^\S*larger\.png: image is 10000x10000 \(100 megapixels\), over the limit "
                                           r"of 64 megapixels$"):
            read_image(larger)
    assert not caught  # Pillow's DecompressionBombWarning was printed above the one-line error
    small = save_gray(tmp_path / "small.png", (20, 10))
    with pytest.raises(CxrError, match="over the limit"):
        read_image(small, max_pixels=199)
    assert read_image(small, max_pixels=200).size == (20, 10)


def test_directory_is_not_an_image(tmp_path):
    with pytest.raises(CxrError, match="is a directory"):
        read_image(tmp_path)


def test_scale_to_uint8_handles_constant_and_nan():
    assert scale_to_uint8(np.full((2, 2), 7.0)).max() == 0
    out = scale_to_uint8(np.array([[np.nan, 0.0], [1.0, 2.0]]))
    np.testing.assert_array_equal(out, [[0, 0], [128, 255]])


def test_scale_to_uint8_maps_each_type_by_its_finite_range_across_blocks(monkeypatch):
    from cxrkit.data import images

    monkeypatch.setattr(images, "_SCALE_CHUNK", 7)  # many blocks: the range must come from all of them
    values = np.array([[-np.inf, 10.0, 20.0, np.nan], [30.0, 40.0, np.inf, 50.0], [10.0, 10.0, 10.0, 10.0]])
    out = scale_to_uint8(values)
    np.testing.assert_array_equal(out, [[0, 0, 64, 0], [128, 191, 0, 255], [0, 0, 0, 0]])
    ramp = np.arange(0, 65536, 257, dtype=np.uint16).reshape(16, 16)  # 16-bit: 0..65535 onto 0..255 exactly
    np.testing.assert_array_equal(scale_to_uint8(ramp).ravel(), np.arange(256))
    signed = np.array([[-1024, 0, 3071]], dtype=np.int16)  # CT-like signed values
    np.testing.assert_array_equal(scale_to_uint8(signed), [[0, 64, 255]])
    assert scale_to_uint8(np.full((3, 3), np.nan)).max() == 0


def test_scale_to_uint8_of_a_large_float_image_needs_little_more_than_its_output():
    import tracemalloc

    image = np.random.default_rng(0).normal(size=(2000, 2000)).astype(np.float32)  # 16 MB in, 4 MB out
    tracemalloc.start()
    try:
        out = scale_to_uint8(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    assert peak < 2.5 * out.nbytes  # whole-image float64 copies took over 16x (64 MB each)
