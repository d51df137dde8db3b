"""Small synthetic chest-X-ray-like datasets for tests: learnable, Kermany-style file names, made in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def xray(rng: np.random.Generator, size: int, bright_patch: bool) -> Image.Image:
    """A noisy gray image; 'pneumonia' images carry a bright square in the left lung field."""
    pixels = rng.normal(90, 20, (size, size)).clip(0, 255)
    if bright_patch:
        s = size // 4
        pixels[s : 2 * s, s : 2 * s] = 230
    return Image.fromarray(pixels.astype(np.uint8), mode="L")


def kermany_folder(root: Path, per_class: int = 12, size: int = 48, splits: tuple[str, ...] = ("train",),
                   seed: int = 0) -> Path:
    """``root/<split>/{NORMAL,PNEUMONIA}`` with Kermany file names; two images per patient, half bacterial."""
    rng = np.random.default_rng(seed)
    patient = 0
    for split in splits:
        for i in range(per_class):
            normal = root / split / "NORMAL"
            normal.mkdir(parents=True, exist_ok=True)
            xray(rng, size, False).save(normal / f"IM-{1000 + patient:04d}-{i % 2 + 1:04d}.jpeg")
            pneu = root / split / "PNEUMONIA"
            pneu.mkdir(parents=True, exist_ok=True)
            kind = "bacteria" if (i // 2) % 2 == 0 else "virus"
            xray(rng, size, True).save(pneu / f"person{patient}_{kind}_{i}.jpeg")
            patient += i % 2
    return root
