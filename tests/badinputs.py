"""The bad and unusual inputs that ``cxr predict`` and the service must both handle, written into a folder.

Each case is ``name -> (file name, expected)``: ``"ok"`` for valid-but-unusual images, which must be predicted, or
a regular expression that the one-line error must match.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CASES: dict[str, tuple[str, str]] = {
    "empty": ("empty.jpeg", r"empty\.jpeg: empty file"),
    "text": ("notes.jpeg", r"notes\.jpeg: not .*image"),
    "truncated-jpeg": ("cut.jpeg", r"cut\.jpeg: corrupt or truncated"),
    # a complete zlib stream holding half the rows: Pillow decoded the rest as black
    "short-png": ("short.png", r"short\.png: corrupt or truncated image \(PNG pixel data ends early"),
    "truncated-dicom": ("cut.dcm", r"cut\.dcm: .*(truncated|cannot|corrupt|pixel data)"),
    "huge-png": ("huge.png", r"huge\.png: image .*(too large|over the limit)"),
    "blank-png": ("blank.png", r"blank\.png: blank image \(every pixel is 0 of 255\): nothing to classify"),
    "blank-dicom": ("flat.dcm", r"flat\.dcm: blank image \(every stored pixel value is 2000\): nothing"),
    # a 1-level checkerboard: scaled by its min and max to 0..255 it looked full-contrast and was predicted
    "near-blank-dicom": ("nearflat.dcm", r"nearflat\.dcm: blank image \(every stored pixel value is 1000 "
                                         r"to 1001\)"),
    # the same in a 16-bit PNG, scaled to 0..255 the same way
    "near-blank-16bit-png": ("nearflat16.png", r"nearflat16\.png: blank image \(every stored pixel value is 1000 "
                                               r"to 1001\)"),
    "16bit-png": ("deep.png", "ok"),
    "cmyk-jpeg": ("cmyk.jpeg", "ok"),
    "palette-png": ("palette.png", "ok"),
    "rgba-png": ("rgba.png", "ok"),
    "exif-jpeg": ("rotated.jpeg", "ok"),
    "dicom-mono1": ("mono1.dcm", "ok"),
    "dicom-mono2": ("mono2.dcm", "ok"),
    # 8-bit values in a 16-bit DICOM: 220 of 65,536 levels, which a rule by share of Bits Stored called blank
    "dicom-8bit-in-16": ("eightbit.dcm", "ok"),
}


def write_cases(folder: Path, size: int = 64) -> dict[str, Path]:
    """Write every case of :data:`CASES` into ``folder``; returns ``case -> path``."""
    from data.helpers import png_first_rows, png_header_only, write_dicom

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
    paths = {case: folder / name for case, (name, _) in CASES.items()}
    paths["empty"].write_bytes(b"")
    paths["text"].write_text("this is a note, not an X-ray\n")
    Image.fromarray(pixels).save(folder / "full.jpeg")
    data = (folder / "full.jpeg").read_bytes()
    paths["truncated-jpeg"].write_bytes(data[: len(data) // 2])
    (folder / "full.jpeg").unlink()
    deep = (rng.random((size, size)) * 4000).astype(np.uint16)
    dicom = write_dicom(folder / "whole.dcm", deep, "MONOCHROME2").read_bytes()
    paths["truncated-dicom"].write_bytes(dicom[: len(dicom) - size * size])  # cut inside the pixel data
    (folder / "whole.dcm").unlink()
    png_first_rows(paths["short-png"], pixels, size // 2)
    png_header_only(paths["huge-png"], 20000, 20000)
    Image.new("L", (size, size)).save(paths["blank-png"])  # models gave such images confident probabilities
    write_dicom(paths["blank-dicom"], np.full((size, size), 2000, dtype=np.uint16), "MONOCHROME2")
    write_dicom(paths["near-blank-dicom"], (1000 + np.indices((size, size)).sum(0) % 2).astype(np.uint16))
    Image.fromarray((1000 + np.indices((size, size)).sum(0) % 2).astype(np.uint16)).save(paths["near-blank-16bit-png"])
    Image.fromarray(pixels.astype(np.uint16) * 257).save(paths["16bit-png"])
    Image.fromarray(pixels).convert("CMYK").save(paths["cmyk-jpeg"])
    Image.fromarray(pixels).convert("P").save(paths["palette-png"])
    rgba = Image.fromarray(pixels).convert("RGBA")
    rgba.putalpha(200)
    rgba.save(paths["rgba-png"])
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(pixels[:, : size // 2]).save(paths["exif-jpeg"], exif=exif.tobytes())
    write_dicom(paths["dicom-mono2"], deep, "MONOCHROME2")
    write_dicom(paths["dicom-mono1"], 4095 - deep, "MONOCHROME1")
    write_dicom(paths["dicom-8bit-in-16"], pixels.astype(np.uint16) * 220 // 255, BitsStored=16, HighBit=15)
    return paths
