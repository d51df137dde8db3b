"""From a recipe to data, preprocessing, loaders and a model: the pieces train, evaluate and predict share."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from cxrkit.config import AugmentConfig, DataConfig, ModelConfig, Recipe, expand_path
from cxrkit.data.base import LabelledImages
from cxrkit.data.transforms import Augment, Preprocessing
from cxrkit.train.runtime import Runtime


def load_data(cfg: DataConfig) -> LabelledImages:
    """Load the dataset a recipe names (any loader: folder, MedMNIST, CSV, combined)."""
    from cxrkit.data.sources import load_dataset

    return load_dataset(expand_paths(cfg))


def expand_paths(cfg: DataConfig) -> DataConfig:
    """``~`` and ``${VARS}`` in data roots, so recipes can say ``${CXR_DATA_DIR}/chest_xray``."""
    root = None if cfg.root is None else expand_path(cfg.root, "data root")
    sources = [{**s, "root": expand_path(s["root"], "data root")} if s.get("root") is not None else s
               for s in cfg.sources]
    return dataclasses.replace(cfg, root=root, sources=sources)


def anchor_paths(recipe: Recipe) -> Recipe:
    """``recipe`` with relative data roots and weight files made absolute (from the working directory), so that the
    recipe saved in a run works from any directory. Paths with ``${VARS}`` or ``~`` stay as written: they are
    expanded where the run is used."""
    from cxrkit.data.sources import is_medmnist_name

    def anchor(path: str | None) -> str | None:
        if path is None or "$" in path or path.startswith("~") or os.path.isabs(path):
            return path
        if not os.path.exists(path) and "/" not in path and is_medmnist_name(path):
            return path  # --data pneumoniamnist: a dataset's name, found in the data folder
        return os.path.abspath(path)

    data = dataclasses.replace(recipe.data, root=anchor(recipe.data.root),
                               sources=[{**s, "root": anchor(s.get("root"))} if s.get("root") else s
                                        for s in recipe.data.sources])
    weights = recipe.model.weights
    if os.path.isfile(weights):  # a file named relative to here; a typo such as "ImageNet" is left for its message
        weights = os.path.abspath(weights)
    return dataclasses.replace(recipe, data=data, model=dataclasses.replace(recipe.model, weights=weights))


def split_data(ds: LabelledImages, cfg: DataConfig) -> dict[str, np.ndarray]:
    """Own splits where the dataset has them, else stratified patient-grouped splits with the recipe's ratios."""
    from cxrkit.data.splits import assign_splits

    split = cfg.split
    return assign_splits(
        ds, ratios=tuple(split.ratios), seed=split.seed, group_by_patient=split.group_by_patient,
        use_own=split.use_own,
    )


def resolve_preprocessing(cfg: ModelConfig) -> Preprocessing:
    """Preprocessing from the backbone's pretrained config; ``model.image_size`` overrides the size only."""
    from cxrkit.models.backbones import preprocessing_of

    pre = preprocessing_of(cfg.backbone)
    size = pre["size"] if cfg.image_size is None else cfg.image_size  # 0 is refused below, not read as "default"
    return Preprocessing(
        size=int(size), mean=tuple(pre["mean"]), std=tuple(pre["std"]),
        interpolation=pre["interpolation"], resize=cfg.resize, crop_pct=float(pre.get("crop_pct", 1.0)),
    )


def augmentation(cfg: AugmentConfig) -> Augment | None:
    if not cfg.enabled:
        return None
    return Augment(
        policy=cfg.policy, hflip=cfg.hflip, rotate=cfg.rotate, translate=cfg.translate, scale=tuple(cfg.scale),
        brightness=cfg.brightness, contrast=cfg.contrast,
    )


def build_model(cfg: ModelConfig, num_outputs: int, weights: str | None = None) -> torch.nn.Module:
    """The classifier of a recipe; ``weights`` overrides ``cfg.weights`` (``none`` when a checkpoint follows)."""
    from cxrkit.models.classifier import build_classifier

    return build_classifier(
        cfg.backbone, num_outputs, weights=weights or cfg.weights, hidden=tuple(cfg.hidden), dropout=cfg.dropout,
    )


def make_loader(
    ds: LabelledImages, transform: Any, batch_size: int, runtime: Runtime, sampler: Any = None,
) -> DataLoader:
    """A DataLoader over ``ds``; without a sampler each process reads its own share, in order.

    The loader has a generator of its own: starting its iteration draws the workers' base seed from it, not from
    the global one. Persistent workers start once per process, so drawing from the global generator would shift
    the dropout of the first epoch of a process (a resumed run's first, not an uninterrupted run's) and make
    results depend on the number of workers."""
    from cxrkit.data.dataset import ImageDataset

    dataset = ImageDataset(ds, transform)
    if sampler is None:
        sampler = list(range(runtime.rank, len(dataset), runtime.world_size))
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=runtime.workers,
        persistent_workers=runtime.workers > 0, pin_memory=runtime.device.type == "cuda",
        generator=torch.Generator().manual_seed(0),
    )

