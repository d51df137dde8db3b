"""Builders for small synthetic test inputs: images, DICOM files, class folders, MedMNIST npz files, CSVs."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def gray(size: tuple[int, int] = (32, 24), seed: int = 0) -> np.ndarray:
    """A random uint8 image of shape (height, width) = (size[1], size[0])."""
    return np.random.default_rng(seed).integers(0, 256, (size[1], size[0]), dtype=np.uint8)


def save_gray(
    path: Path, size: tuple[int, int] = (32, 24), seed: int = 0, fmt: str | None = None, **options: object
) -> Path:
    """Write a random 8-bit grayscale image (format from the suffix unless ``fmt``; ``options`` go to Pillow)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(gray(size, seed)).save(path, format=fmt, **options)
    return path


def _png(path: Path, width: int, height: int, bit_depth: int, pixel_data: bytes) -> Path:
    """A greyscale PNG of IHDR, one IDAT holding ``pixel_data`` (filter bytes included) compressed, and IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(pixel_data))
                     + chunk(b"IEND", b""))
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that claims ``width x height`` 1-bit pixels (IHDR, empty IDAT, IEND): a decompression bomb stand-in."""
    return _png(path, width, height, 1, b"")


def png_first_rows(path: Path, pixels: np.ndarray, rows: int) -> Path:
    """An 8-bit greyscale PNG of ``pixels``' size whose zlib stream is complete but holds only the first ``rows``
    rows (as from a writer that stopped early)."""
    height, width = pixels.shape
    data = b"".join(b"\x00" + bytes(row) for row in pixels[:rows].astype(np.uint8))  # filter type 0 per row
    return _png(path, width, height, 8, data)


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", **attrs: object) -> Path:
    """An uncompressed (Explicit VR Little Endian) DICOM file; ``pixels`` is (rows, cols) or (frames, rows, cols)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype(np.int16 if ds.PixelRepresentation else np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def kermany_like(root: Path, splits: tuple[str, ...] = ("train",), size: int = 16) -> Path:
    """``root/<split>/{NORMAL,PNEUMONIA}`` with Kermany names: 3 normal and 3 pneumonia patients, 2 images each."""
    for s, split in enumerate(splits):
        for p in range(3):
            patient = 100 * s + p
            for k in range(2):
                save_gray(root / split / "NORMAL" / f"IM-{patient:04d}-{k + 1:04d}.jpeg", (size, size), patient)
                kind = "bacteria" if p < 2 else "virus"
                name = f"person{patient}_{kind}_{10 * patient + k}.jpeg"
                save_gray(root / split / "PNEUMONIA" / name, (size, size), 1000 + patient)
    return root


def covid_like(root: Path, per_class: int = 3, size: int = 16) -> Path:
    """``root/{COVID,Normal}/<Class>-<n>.png`` as in the COVID-19 Radiography Database."""
    for cls in ("COVID", "Normal"):
        for n in range(1, per_class + 1):
            save_gray(root / cls / f"{cls}-{n}.png", (size, size), n)
    return root


def medmnist_npz(
    path: Path, counts: dict[str, int], n_labels: int = 1, size: int = 28, multilabel: bool = False
) -> Path:
    """An npz with MedMNIST's keys; image ``i`` of each split is filled with the value ``i``."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in counts.items():
        arrays[f"{split}_images"] = np.stack([np.full((size, size), i, dtype=np.uint8) for i in range(n)])
        if multilabel:
            arrays[f"{split}_labels"] = rng.integers(0, 2, (n, n_labels)).astype(np.uint8)
        else:
            arrays[f"{split}_labels"] = (np.arange(n) % max(n_labels, 2)).reshape(n, 1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path
