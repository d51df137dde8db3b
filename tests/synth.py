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


def nih_csv(root: Path, n: int = 40, size: int = 32) -> Path:
    """A ChestX-ray14-style CSV (multi-label ``Finding Labels``) with ``images/``; odd images carry the patch."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    lines = ["Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position"]
    findings = ["No Finding", "Effusion", "Cardiomegaly|Effusion", "Atelectasis"]
    for i in range(n):
        name = f"{i:08d}_000.png"
        xray(rng, size, i % 2 == 1).save(root / "images" / name)
        lines.append(f"{name},{findings[i % 4]},0,{i // 2},50,M,PA")
    csv_path = root / "Data_Entry_2017_v2020.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path


def patch_folder(root: Path, per_class: int = 60, size: int = 128, side: int = 36,
                 seed: int = 0) -> dict[str, tuple[int, int, int, int]]:
    """``root/{ABSENT,PATCH}/*.png``: noise, and noise with a bright square centred on one of the cells of a
    32-pixel grid (the feature-map cells of a stride-32 CNN), at a random cell per image.

    Returns:
        The patch box ``(left, top, right, bottom)`` of every PATCH image, by path.
    """
    rng = np.random.default_rng(seed)
    boxes: dict[str, tuple[int, int, int, int]] = {}
    cells, half = size // 32, side // 2
    for label in ("ABSENT", "PATCH"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.normal(100, 25, (size, size))
            path = root / label / f"{label.lower()}-{i:04d}.png"
            if label == "PATCH":
                cy, cx = (16 + 32 * int(rng.integers(cells)) for _ in range(2))
                box = (max(0, cx - half), max(0, cy - half), min(size, cx + half), min(size, cy + half))
                pixels[box[1] : box[3], box[0] : box[2]] += 90
                boxes[str(path)] = box
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="L").save(path)
    return boxes


def with_logits(run: Path, dest: Path, logits: dict[str, float], others: float = -6.0) -> Path:
    """A copy of ``run`` at ``dest`` whose model answers every image with (nearly) the given logits after the run's
    temperature, so its calibrated probabilities are known: the last head layer's weights are scaled by 1e-4 (kept,
    so that Grad-CAM still has gradients to follow) and its bias set; labels not in ``logits`` get ``others``."""
    import json
    import shutil

    import torch

    from cxrkit.runs import Run

    shutil.copytree(run, dest)
    info = json.loads((dest / "labels.json").read_text())
    temperature = float(info.get("temperature") or 1.0)
    copy = Run.open(dest)
    for name in ("best", "last"):
        state = copy.load_checkpoint(name)
        weights = state["model"]
        last = [key for key in weights if key.startswith("head.") and key.endswith(".weight")][-1]
        weights[last] = weights[last] * 1e-4
        weights[last.removesuffix("weight") + "bias"] = torch.tensor(
            [temperature * logits.get(label, others) for label in info["labels"]])
        copy.save_checkpoint(name, state)
    return dest
