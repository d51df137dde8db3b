"""Tiny comparison specs over synthetic data: mobilenet_v3_small from scratch at 32 px, one epoch per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

TINY_SET = ["model.backbone=mobilenet_v3_small", "model.weights=none", "model.image_size=32",
            "runtime.batch_size=8", "runtime.eval_batch_size=16", "runtime.workers=0", "runtime.precision=fp32"]

TWO_BY_TWO = {
    "strategy": {
        "head-only": {"stages": [{"name": "head", "trainable": "head", "epochs": 1, "lr": "1e-3"}]},
        "two-stage": ["stages=[{name: head, trainable: head, epochs: 1, lr: 1e-3}, "
                      "{name: finetune, trainable: all, epochs: 1, lr: 1e-4}]"],
    },
    "seed": [0, 1],
}


def write_base_recipe(folder: Path, data: Path) -> Path:
    """A base recipe over ``data`` with a fixed patient-grouped split."""
    recipe = {
        "name": "tiny", "seed": 0,
        "data": {"root": str(data), "task": "auto",
                 "split": {"ratios": [0.6, 0.2, 0.2], "seed": 0, "group_by_patient": True}},
        "stages": [{"name": "head", "trainable": "head", "epochs": 1, "lr": 1.0e-3}],
    }
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def write_spec(folder: Path, data: Path, name: str = "tiny", matrix: dict[str, Any] | None = None,
               **extra: Any) -> Path:
    """A spec in ``folder`` whose base recipe (``base.yaml``, relative to the spec) trains on ``data``."""
    folder.mkdir(parents=True, exist_ok=True)
    write_base_recipe(folder, data)
    spec = {"name": name, "description": "a <tiny> comparison & test", "recipe": "base.yaml", "set": TINY_SET,
            "matrix": TWO_BY_TWO if matrix is None else matrix, "evaluate": {"split": "test"}, **extra}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
