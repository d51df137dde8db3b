"""Cached features for feature-extraction stages.

When a stage trains only the head and the inputs are not augmented, the frozen backbone (BatchNorm and Dropout in
inference mode) gives the same features for an image in every epoch. So it runs once per image, its pooled
output is kept in memory, and the head trains on it: the same computation, seconds per epoch instead of minutes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from cxrkit.train.runtime import Runtime


class FeatureDataset(Dataset):
    """Stored features with their targets, in the sample-dict format of :class:`cxrkit.data.dataset.ImageDataset`."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor):
        self.features, self.targets = features, targets

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.features[index], "target": self.targets[index], "index": index}


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, loader: DataLoader, runtime: Runtime, progress: Any = None,
                     description: str = "features") -> FeatureDataset:
    """Run ``backbone`` in inference mode over ``loader`` (in order) and keep its outputs as fp32."""
    was_training = backbone.training
    backbone.eval()
    task = progress.add_task(description, total=len(loader), rate="") if progress is not None else None
    features, targets = [], []
    for batch in loader:
        with runtime.autocast():
            out = backbone(runtime.to_device(batch["image"]))
        features.append(out.float().cpu())
        targets.append(batch["target"])
        if task is not None:
            progress.update(task, advance=1)
    if task is not None:
        progress.remove_task(task)
    backbone.train(was_training)
    return FeatureDataset(torch.cat(features), torch.cat(targets))


def feature_loader(dataset: FeatureDataset, batch_size: int, sampler: Any = None) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler or range(len(dataset)), num_workers=0)
