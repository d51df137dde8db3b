"""DICOM decoding with pydicom: stored values to the 8-bit grayscale picture a radiologist would see.

The pipeline follows DICOM PS3.3 C.11 (grayscale transformations): modality LUT (Rescale Slope / Intercept), then
the VOI LUT or window (Window Center / Width), then MONOCHROME1 is inverted so that bright always means dense, and
the result is scaled to 0..255 by its min and max.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image

from cxrkit.data.images import DEFAULT_MAX_PIXELS, STORED_RANGE, over_limit, scale_to_uint8
from cxrkit.errors import CxrError, NotAnImage, first_line

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def read_dicom(
    source: str | os.PathLike | bytes, name: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode a single-frame DICOM image to an 8-bit grayscale PIL image.

    Args:
        source: a file path or the file's bytes.
        name: what to call the data in error messages (defaults to the path).
        max_pixels: refuse images with more pixels than this.

    Returns:
        A mode ``L`` image; MONOCHROME1 and MONOCHROME2 encodings of the same picture give the same pixels.

    Raises:
        CxrError: unreadable or truncated file, no pixel data, multi-frame, too large or an undecodable
            (e.g. compressed without a decoder plugin) pixel encoding.
    """
    name = name if name is not None else str(source) if not isinstance(source, bytes) else "<dicom bytes>"
    try:
        return _read_dicom(source, name, max_pixels)
    except CxrError:
        raise
    except Exception as e:  # noqa: BLE001 - pydicom parses lazily, so a damaged file can raise almost anything
        raise CxrError(f"{name}: corrupt or truncated DICOM file ({first_line(e)})") from e


def _read_dicom(source: str | os.PathLike | bytes, name: str, max_pixels: int) -> Image.Image:
    ds = _read_dataset(source, name)
    _check_single_frame_image(ds, name, max_pixels)
    try:
        arr = ds.pixel_array
    except Exception as e:  # pydicom raises many types for bad or compressed pixel data; report them all as one
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        encoding = f"{syntax.name}, transfer syntax {syntax}" if syntax is not None else "unknown transfer syntax"
        why = "damaged compressed data, or no decoder for it installed" if getattr(syntax, "is_compressed", False) \
            else "damaged data"
        raise CxrError(f"{name}: cannot decode DICOM pixel data ({encoding}; {why}): {first_line(e)}") from e
    image = Image.fromarray(dicom_to_uint8(arr, ds, name))
    if arr.ndim == 2 and arr.size and np.issubdtype(arr.dtype, np.integer):  # what scaling to 0..255 hides
        image.info[STORED_RANGE] = (float(arr.min()), float(arr.max()))
    return image


def dicom_to_uint8(arr: np.ndarray, ds: Any, name: str = "<dicom>") -> np.ndarray:
    """Apply modality LUT, VOI LUT / window and MONOCHROME1 inversion, then scale to uint8 by min/max.

    Args:
        arr: the stored pixel values (``ds.pixel_array``), 2-D, or 3-D with samples last for colour.
        ds: the pydicom dataset the values came from.
        name: used in error messages.

    Returns:
        A 2-D uint8 array.
    """
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:  # colour (RGB, or YBR already converted to RGB by pydicom): ITU-R 601 luma
        return scale_to_uint8(arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
    if arr.ndim != 2:
        raise CxrError(f"{name}: expected a 2-D DICOM image, got pixel array of shape {arr.shape}")
    values = _display_values(arr, ds, name)
    if photometric == "MONOCHROME1":  # low values are white: negate before the min/max scaling
        values = -values
    return scale_to_uint8(values)


def _display_values(arr: np.ndarray, ds: Any, name: str) -> np.ndarray:
    """Stored values through the modality LUT and the first VOI LUT or window, as float64."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        values = apply_modality_lut(arr, ds)
        values = apply_voi_lut(values, ds, index=0)
    except Exception as e:  # noqa: BLE001 - a malformed LUT raises struct.error, ValueError, IndexError, ...
        raise CxrError(f"{name}: invalid DICOM LUT or window attributes ({first_line(e)})") from e
    return np.asarray(values, dtype=np.float64)


def dicom_header_problem(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> str | None:
    """Why a DICOM file cannot be used (damaged header, no pixel data, multi-frame, too large, uncompressed pixel
    data shorter than its rows and columns need or cut off by the end of the file, invalid LUT or window), or None.
    The pixel data is not read (it stays deferred), so this costs about as much as reading the header."""
    try:
        ds = _read_dataset(path, str(path), defer_size=1024)
        _check_single_frame_image(ds, str(path), max_pixels)
        _check_pixel_data_length(ds, str(path), os.path.getsize(path))
        if int(ds.get("SamplesPerPixel", 1) or 1) == 1:  # the grey-level transforms, tried on one stored value
            _display_values(np.zeros((1, 1), dtype=np.int32), ds, str(path))
    except CxrError as err:
        return str(err).removeprefix(f"{path}: ")
    except Exception as err:  # noqa: BLE001 - pydicom parses lazily, so a damaged file can raise almost anything
        return f"corrupt or truncated DICOM file ({first_line(err)})"
    return None


def _read_dataset(source: str | os.PathLike | bytes, name: str, defer_size: int | None = None) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except OSError as e:
        raise CxrError(f"{name}: cannot open DICOM file ({e.strerror or e})") from e
    with fp:
        try:
            ds = pydicom.dcmread(fp, force=True, defer_size=defer_size)
        except InvalidDicomError as e:
            raise CxrError(f"{name}: not a valid DICOM file ({first_line(e)})") from e
    _infer_transfer_syntax(ds)
    return ds


def _infer_transfer_syntax(ds: Any) -> None:
    """A dataset written without its file meta (no preamble, no ``DICM``; older or raw exports) does not say how its
    pixels are encoded; it was read as implicit or explicit VR, little or big endian, which are the uncompressed
    transfer syntaxes, so name that one and the pixels can be decoded."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None or little is None:
        return
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax


def _check_pixel_data_length(ds: Any, name: str, file_size: int) -> None:
    """Uncompressed pixel data must hold what Rows, Columns, Bits Allocated and Samples per Pixel declare, and the
    file must hold the pixel data (a copy cut short, a header that declares a larger image). Compressed (encapsulated)
    pixel data is checked when it is decoded."""
    from pydicom.pixels.utils import get_expected_length

    element = next((ds.get_item(k, keep_deferred=True) for k in _PIXEL_KEYWORDS if k in ds), None)
    length, start = getattr(element, "length", None), getattr(element, "value_tell", None)
    if length is None or start is None or length == 0xFFFFFFFF:  # read already, or encapsulated (undefined length)
        return
    if start + length > file_size:
        raise CxrError(f"{name}: truncated DICOM file (its pixel data needs {length} bytes, the file ends after "
                       f"{max(file_size - start, 0)})")
    if element.tag == 0x7FE00010:  # PixelData: the dimensions say how long it must be
        try:
            expected = get_expected_length(ds)
        except (AttributeError, ValueError, TypeError, KeyError):
            return  # attributes that decoding reports in its own words
        if length < expected:
            raise CxrError(f"{name}: DICOM pixel data is {length} bytes, but {int(ds.Columns)}x{int(ds.Rows)} pixels "
                           f"of {int(ds.BitsAllocated)} bits need {expected} (a damaged file or header)")


def _check_single_frame_image(ds: Any, name: str, max_pixels: int) -> None:
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        if getattr(ds, "preamble", None) is None:  # read with force=True and no DICM header: probably not DICOM
            raise NotAnImage(f"{name}: not a DICOM file (no DICM header and no pixel data)")
        raise CxrError(f"{name}: DICOM file has no pixel data (cut short, or a DICOM object that is not an image)")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, ValueError, TypeError) as e:
        raise CxrError(f"{name}: DICOM image attributes missing or invalid ({e})") from e
    if frames > 1:
        raise CxrError(f"{name}: multi-frame DICOM ({frames} frames) is not supported; export a single frame")
    if rows * cols > max_pixels:
        raise CxrError(f"{name}: {over_limit(cols, rows, max_pixels)}")
