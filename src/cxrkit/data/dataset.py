"""The torch view of a :class:`~cxrkit.data.base.LabelledImages`, and label mapping for external validation."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from cxrkit.data.base import LabelledImages
from cxrkit.data.labels import find_label, label_key
from cxrkit.errors import CxrError


class ImageDataset(Dataset):
    """Samples ``{"image", "target", "index"}`` of a labelled image collection.

    ``target`` is an int64 scalar (class index) for binary and multiclass data and a float32 vector with nan for
    unknown labels for multilabel data; ``index`` is the item's position in ``data.items``, which keeps its source
    path and patient id.

    A key is an index, or ``(index, seed)`` (from :class:`~cxrkit.train.sampling.WithSeeds`): the transform's
    random choices then come from ``seed`` alone, and the process's random state is left as it was.
    """

    def __init__(self, data: LabelledImages, transform: Callable[[Any], torch.Tensor]) -> None:
        """Wrap ``data``; ``transform`` maps the reader's PIL image to the model's input tensor."""
        self.data = data
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def targets(self) -> torch.Tensor:
        """Every item's target, as :meth:`__getitem__` gives it, without reading an image."""
        return torch.from_numpy(self.data.targets())

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        item = self.data.items[index]
        image = self.data.reader(item)
        if seed is None:
            image = self.transform(image)
        else:
            # torchvision's random transforms draw from the default generator; torch.random.fork_rng would also
            # save and seed every accelerator, at about 100x the cost per image
            generator = torch.default_generator
            state = generator.get_state()
            try:
                generator.manual_seed(seed)
                image = self.transform(image)
            finally:
                generator.set_state(state)
        if self.data.spec.task == "multilabel":
            target = torch.tensor(item.target, dtype=torch.float32)
        else:
            target = torch.tensor(int(item.target), dtype=torch.int64)
        return {"image": image, "target": target, "index": index}


def label_mapping(
    source_labels: Sequence[str], target_labels: Sequence[str], mapping: Mapping[str, str] | None = None,
    unmapped_ok: bool = False,
) -> list[int | None]:
    """Map a dataset's labels onto a model's labels by name, for external validation.

    Args:
        source_labels: the dataset's label names.
        target_labels: the model's label names.
        mapping: explicit ``{source name: target name}`` pairs, e.g. ``{"COVID": "PNEUMONIA"}``; other labels are
            matched by name. All matching is case-insensitive.
        unmapped_ok: a source label without a counterpart maps to None instead of being an error (multi-label
            data, whose other labels the model does not predict).

    Returns:
        For each source label, the index of its target label (None: none, with ``unmapped_ok``).

    Raises:
        CxrError: a source label (or a mapping's key or value) has no counterpart; the message lists both sets.
    """
    explicit: dict[str, str] = {}
    for src, dst in (mapping or {}).items():
        if find_label(src, source_labels) is None or find_label(dst, target_labels) is None:
            raise CxrError(
                f"label mapping {src!r} -> {dst!r} does not match: dataset labels {list(source_labels)}, "
                f"model labels {list(target_labels)}"
            )
        explicit[label_key(src)] = dst
    out, unmapped = [], []
    for label in source_labels:
        idx = find_label(explicit.get(label_key(label), label), target_labels)
        if idx is None:
            unmapped.append(label)
        out.append(idx)
    if unmapped and not unmapped_ok:
        raise CxrError(
            f"cannot map dataset labels {unmapped} onto the model's labels: dataset labels {list(source_labels)}, "
            f"model labels {list(target_labels)}; say which model label each one means, e.g. "
            f"--map {unmapped[0]}=LABEL on the command line (label_map={{{unmapped[0]!r}: LABEL}} in Python)"
        )
    return out
