"""Robust image decoding: any common file or DICOM in, an 8-bit grayscale PIL image out, or one clear error.

The format is sniffed from the bytes (Pillow's own detection, and the ``DICM`` magic at byte 128 for DICOM), never
trusted from the file name. Every failure raises :class:`~cxrkit.errors.CxrError` naming the file and the problem.
Nothing here changes Pillow's global settings (``LOAD_TRUNCATED_IMAGES``, ``MAX_IMAGE_PIXELS``).
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cxrkit.data.base import Item
from cxrkit.data.png import short_pixel_data
from cxrkit.errors import CxrError, NotAnImage, first_line, printable

DEFAULT_MAX_PIXELS = 64_000_000
DICOM_SUFFIXES = (".dcm", ".dicom")

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".jp2", *DICOM_SUFFIXES})
SNIFF_BYTES = 132  # enough for every signature below, DICOM's "DICM" at offset 128 included
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"BM", "BMP"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"),
)

# Errors Pillow raises while decoding broken data; all become one CxrError.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, ZeroDivisionError)


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image file as an 8-bit grayscale (mode ``L``) PIL image.

    Args:
        path: image file (PNG, JPEG, TIFF, WebP, BMP, GIF, DICOM, ...).
        max_pixels: refuse images with more pixels than this (decompression bombs).

    Returns:
        The decoded image, mode ``L``, orientation from EXIF applied.

    Raises:
        CxrError: the file is missing, empty, not an image, corrupt, too large or a multi-frame DICOM.
    """
    p = Path(path)
    name = printable(str(p))
    if not p.exists():
        raise CxrError(f"{name}: file does not exist")
    if p.is_dir():
        raise CxrError(f"{name}: is a directory, not an image file")
    if problem := name_problem(p.name):
        raise CxrError(f"{name}: {problem}")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise CxrError(f"{name}: cannot read file ({e.strerror or e})") from e
    return decode_image_bytes(data, name, max_pixels=max_pixels)


def name_problem(name: str) -> str | None:
    """Why a file or folder name cannot go into cxrkit's outputs as it is (CSV, JSON and logs are UTF-8 text, one
    line per image), or None: bytes that are not UTF-8, or a control character such as a carriage return."""
    if not name.isprintable() and re.search(r"[\x00-\x1f\x7f]", name):
        return "its name holds a control character; rename it"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8; rename it"
    return None


def read_item(item: Item) -> Image.Image:
    """Reader for loaders whose ``Item.source`` is an image file path."""
    return read_image(item.source)


def is_dicom_bytes(data: bytes) -> bool:
    """Whether ``data`` starts like a DICOM Part 10 file (128-byte preamble, then ``DICM``)."""
    return len(data) >= 132 and data[128:132] == b"DICM"


# Markers a complete file ends with; a file cut short (the usual corruption) lacks them. Some writers append a few
# bytes after the marker, so the end of the file is searched rather than its last bytes only.
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
_TAIL_BYTES = 1024


def truncation_reason(path: str | os.PathLike, fmt: str | None) -> str | None:
    """Why a JPEG or PNG file looks cut short (its end marker is missing), or None; reads only its last bytes."""
    marker = _END_MARKERS.get(fmt or "")
    if marker is None:
        return None
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - _TAIL_BYTES))
        tail = fh.read()
    return None if marker in tail else f"truncated {fmt} (no end-of-image marker)"


def header_problem(path: str | os.PathLike, fmt: str | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Why a file's header already rules it out (too many pixels; for DICOM also no pixel data, several frames or a
    damaged header), or None. Reads the header only: the pixels are decoded when the image is used."""
    if fmt == "DICOM" or (fmt is None and str(path).lower().endswith(DICOM_SUFFIXES)):
        from cxrkit.data.dicom import dicom_header_problem

        return dicom_header_problem(path, max_pixels)
    try:
        with _open(path) as im:
            width, height = im.size
    except Image.DecompressionBombError as err:
        return _too_large(err, max_pixels)
    except (UnidentifiedImageError, *_DECODE_ERRORS) as err:
        return f"corrupt {fmt or 'image'} header ({first_line(err)})"
    if width * height > max_pixels:
        return over_limit(width, height, max_pixels)
    return None


def _open(source: Any) -> Image.Image:
    """``Image.open`` without Pillow's warning for images over 89 megapixels (on stderr, or in a service's log):
    cxrkit checks every image against its own limit before decoding and says so in one line. The filter is set
    for this call only, not for the user's process (the service's decoding threads racing here can at worst leave
    this one filter in place)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(source)


def over_limit(width: int, height: int, max_pixels: int) -> str:
    """Why an image of ``width`` x ``height`` pixels is refused (more than ``max_pixels``)."""
    return (f"image is {width}x{height} ({width * height / 1e6:.0f} megapixels), over the limit of "
            f"{max_pixels / 1e6:g} megapixels")


def _too_large(err: Image.DecompressionBombError, max_pixels: int) -> str:
    """Pillow's refusal of a decompression bomb (over twice its own limit, found before cxrkit's check could run),
    said with cxrkit's limit."""
    found = re.search(r"\((\d+) pixels\)", str(err))
    size = f" ({int(found.group(1)) / 1e6:.0f} megapixels)" if found else ""
    return f"image too large{size}, over the limit of {max_pixels / 1e6:g} megapixels; a possible decompression bomb"


def content_problem(path: str | os.PathLike) -> str | None:
    """Why a file's first bytes and header already rule it out as an image (unreadable, empty, no known image
    format, truncated, too many pixels, an unusable DICOM), or None. Reads the header only."""
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as e:
        return f"cannot read file ({e.strerror or e})"
    if not head:
        return "empty file"
    fmt = sniff_format(head)
    if fmt is None and not str(path).lower().endswith(DICOM_SUFFIXES):
        return "not an image (unrecognised content)"
    return truncation_reason(path, fmt) or header_problem(path, fmt)


STORED_RANGE = "cxrkit.stored_range"
"""``Image.info`` key of a decoded grayscale DICOM with integer pixels, or of a 16- or 32-bit integer image: its
lowest and highest stored value (set in :mod:`cxrkit.data.dicom` and :func:`to_grayscale`), for
:func:`refuse_blank`."""

BLANK_LEVELS = 2  # an image whose pixels (its stored values) all lie within this many levels of each other


def refuse_blank(image: Image.Image, name: str) -> Image.Image:
    """``image`` (decoded from ``name``), unless it shows nothing: every pixel the same grey, give or take
    :data:`BLANK_LEVELS` (an unexposed or failed acquisition, a placeholder); for a DICOM or a 16-bit image, every
    stored value. A model still returns confident-looking probabilities for such an image, so prediction refuses it
    with a :class:`CxrError` naming ``name``. A DICOM is judged by its stored values, not by a share of the range
    its Bits Stored allows: 8-bit pictures are often stored in 16 bits."""
    stored = image.info.get(STORED_RANGE)
    if stored is not None:  # its 0..255 image spans min to max, so a 1-level checkerboard would look full-contrast
        low, high = stored
        if high - low <= BLANK_LEVELS:
            level = f"{low:g}" if low == high else f"{low:g} to {high:g}"
            raise CxrError(f"{name}: blank image (every stored pixel value is {level}): nothing to classify")
    low, high = image.convert("L").getextrema()
    if high - low > BLANK_LEVELS:
        return image
    level = f"{low}" if low == high else f"{low} to {high}"
    raise CxrError(f"{name}: blank image (every pixel is {level} of 255): nothing to classify")


def as_image(image: Any, name: str) -> Image.Image:
    """An image given in memory or by its path, made what :func:`read_image` makes of a file: mode ``L``, a high bit
    depth scaled by its own range, a blank image refused (:func:`refuse_blank`).

    Args:
        image: A PIL image; a NumPy array ``HxW`` (any number type: 16-bit and float arrays are scaled by their own
            range, as 16-bit PNGs and float TIFFs are) or ``HxWx3`` / ``HxWx4`` of ``uint8``; or a file path.
        name: What errors call it (such as ``"image 3"``).
    """
    if isinstance(image, str | os.PathLike):
        return refuse_blank(read_image(image), os.fspath(image))
    if isinstance(image, np.ndarray):
        image = _from_array(image, name)
    if not isinstance(image, Image.Image):
        raise CxrError(f"{name}: not an image but a {type(image).__name__}; give a PIL image, a NumPy array or a "
                       "file path")
    if not image.width or not image.height:
        raise CxrError(f"{name}: image has zero size ({image.width}x{image.height})")
    return refuse_blank(to_grayscale(image), name)


def _from_array(arr: np.ndarray, name: str) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        if arr.dtype != np.uint8:
            raise CxrError(f"{name}: a colour array must be uint8 (0..255), not {arr.dtype}")
        return Image.fromarray(np.ascontiguousarray(arr), "RGB" if arr.shape[2] == 3 else "RGBA")
    if arr.ndim != 2:
        raise CxrError(f"{name}: an array of shape {arr.shape} is not an image (HxW, or HxWx3 / HxWx4 uint8)")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise CxrError(f"{name}: an array of {arr.dtype} is not an image")
    if arr.dtype == np.bool_:  # a mask: black and white, as a 1-bit image file is read
        arr = arr.astype(np.uint8) * 255
    if arr.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(arr), "L")
    if np.issubdtype(arr.dtype, np.integer):
        return Image.fromarray(arr.astype(np.int32), "I")  # scaled by its own range, as a 16-bit file is
    return Image.fromarray(arr.astype(np.float32), "F")


def sniff_format(head: bytes) -> str | None:
    """Name the image format from a file's first bytes (at least 132 for DICOM), or None if unrecognised."""
    if is_dicom_bytes(head):
        return "DICOM"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode_image_bytes(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes (e.g. an upload) to an 8-bit grayscale PIL image.

    Args:
        data: the file's bytes.
        name: what to call the data in error messages (a path or an upload's file name).
        max_pixels: refuse images with more pixels than this.

    Returns:
        The decoded image, mode ``L``.

    Raises:
        CxrError: ``"<name>: <problem>"`` for empty, unrecognised, corrupt, truncated or oversized data.
    """
    if not data:
        raise CxrError(f"{name}: empty file (0 bytes)")
    if is_dicom_bytes(data):
        return _decode_dicom(data, name, max_pixels)
    try:
        im = _open(io.BytesIO(data))
    except UnidentifiedImageError as e:
        if name.lower().endswith(DICOM_SUFFIXES):  # DICOM written without the preamble
            return _decode_dicom(data, name, max_pixels)
        fmt = sniff_format(data[:SNIFF_BYTES])
        if fmt is not None:  # the signature is there, the rest is not: damaged rather than foreign
            raise CxrError(f"{name}: corrupt {fmt} file (its header cannot be read)") from e
        raise NotAnImage(f"{name}: not an image (unrecognised format)") from e
    except Image.DecompressionBombError as e:
        raise CxrError(f"{name}: {_too_large(e, max_pixels)}") from e
    except _DECODE_ERRORS as e:
        raise CxrError(f"{name}: corrupt image header ({e})") from e
    image = _finish(im, name, max_pixels)
    if im.format == "PNG" and _ends_black(im):  # where Pillow fills the rows a PNG's pixel data lacks
        short = short_pixel_data(data)
        if short:
            raise CxrError(f"{name}: corrupt or truncated image ({short})")
    return image


def _ends_black(im: Image.Image) -> bool:
    """Whether the decoded image's last two rows are all zero (the last pass of an interlaced PNG fills the odd
    rows), as Pillow leaves the rows of a PNG whose pixel data ends early."""
    return not np.asarray(im.crop((0, max(0, im.height - 2), im.width, im.height))).any()


def _decode_dicom(data: bytes, name: str, max_pixels: int) -> Image.Image:
    from cxrkit.data.dicom import read_dicom  # pydicom is only needed for DICOM input

    return read_dicom(data, name, max_pixels=max_pixels)


def _finish(im: Image.Image, name: str, max_pixels: int) -> Image.Image:
    """Size check, full decode, orientation and conversion to mode ``L``."""
    width, height = im.size
    if width * height > max_pixels:
        raise CxrError(f"{name}: {over_limit(width, height, max_pixels)}")
    if width == 0 or height == 0:
        raise CxrError(f"{name}: image has zero size ({width}x{height})")
    try:
        im.seek(0)  # multi-frame GIF/TIFF: the first frame
        im.load()  # force the full decode so truncated data fails here, not later
        im = ImageOps.exif_transpose(im) or im
    except Image.DecompressionBombError as e:
        raise CxrError(f"{name}: {_too_large(e, max_pixels)}") from e
    except _DECODE_ERRORS as e:
        raise CxrError(f"{name}: corrupt or truncated image ({e})") from e
    return to_grayscale(im)


def to_grayscale(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit ``L``.

    High bit depth (``I;16*``, ``I``, ``F``) is scaled by the image's own min and max, and an integer image keeps
    its lowest and highest value under :data:`STORED_RANGE` (for :func:`refuse_blank`); alpha is dropped; palette,
    CMYK and other colour modes go through RGB and then ITU-R 601 luma (Pillow's ``L`` conversion).
    """
    if im.mode == "L":
        return im
    if im.mode in ("1", "P", "RGB", "RGBA", "LA", "PA", "La", "RGBa"):
        return im.convert("L")
    if im.mode.startswith("I") or im.mode.startswith("F"):
        arr = np.asarray(im)
        out = Image.fromarray(scale_to_uint8(arr))
        if im.mode.startswith("I") and arr.size:  # what scaling to 0..255 hides, as for a DICOM's stored values
            out.info[STORED_RANGE] = (float(arr.min()), float(arr.max()))
        return out
    return im.convert("RGB").convert("L")


_SCALE_CHUNK = 1 << 18  # elements per block: a 64-megapixel float image is scaled in 2 MB pieces, not 2 GB of copies


def scale_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Linearly map an array's min..max to 0..255 (a constant image becomes all zeros); nan counts as the min.

    Works block by block, so the extra memory is a few MB whatever the image's size and type.
    """
    arr = np.asarray(arr)
    out = np.zeros(arr.shape, dtype=np.uint8)
    flat, flat_out = arr.reshape(-1), out.reshape(-1)
    blocks = [slice(i, i + _SCALE_CHUNK) for i in range(0, flat.size, _SCALE_CHUNK)]
    exact = np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_
    lo, hi = np.inf, -np.inf
    for block in blocks:
        part = flat[block] if exact else flat[block][np.isfinite(flat[block])]
        if part.size:
            lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
    if not hi > lo:  # no finite value, or a constant image
        return out
    scale = 255.0 / (hi - lo)
    for block in blocks:
        part = flat[block].astype(np.float64)
        if not exact:
            part[~np.isfinite(part)] = lo
        part -= lo
        part *= scale
        np.rint(part, out=part)
        np.clip(part, 0, 255, out=part)
        flat_out[block] = part
    return out
