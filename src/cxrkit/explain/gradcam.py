"""Class activation maps from the ``grad-cam`` package (pytorch-grad-cam), wrapped so they are safe in long loops.

The methods are the package's own; this module only chooses the target layer (the backbone spec's ``cam_layer``
unless the user names another), keeps the hooks for exactly as long as an :class:`Explainer` is open (released
on errors too, and never swallowing them, which the package's own ``__exit__`` does for ``IndexError``), and
drops the autograd graph and saved activations after every batch so memory stays flat over thousands of images.

Gradients are taken with respect to the input rather than the weights (parameters are frozen while the explainer
is open), so no ``.grad`` buffers are allocated for the model and the run's weights are left untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from cxrkit.console import muted
from cxrkit.data.labels import find_label
from cxrkit.errors import CxrError
from cxrkit.explain.layers import resolve_layer

# name -> (class name in pytorch_grad_cam, uses gradients, display name)
METHODS: dict[str, tuple[str, bool, str]] = {
    "gradcam": ("GradCAM", True, "Grad-CAM"),
    "gradcam++": ("GradCAMPlusPlus", True, "Grad-CAM++"),
    "xgradcam": ("XGradCAM", True, "XGrad-CAM"),
    "layercam": ("LayerCAM", True, "LayerCAM"),
    "hirescam": ("HiResCAM", True, "HiResCAM"),
    "eigengradcam": ("EigenGradCAM", True, "Eigen-Grad-CAM"),
    "scorecam": ("ScoreCAM", False, "Score-CAM"),
    "eigencam": ("EigenCAM", False, "Eigen-CAM"),
}


def method_info(name: str) -> tuple[str, bool, str]:
    """``(class name, uses gradients, display name)`` of a method; unknown names raise a clear error."""
    key = name.lower().replace("_", "").replace("-", "").replace("plusplus", "++")
    if key not in METHODS:
        raise CxrError(f"unknown CAM method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[key]


class ProbabilityTarget:
    """The calibrated probability of one output: what a user reads, and what the faithfulness check measures.

    Softmax over classes for ``binary``/``multiclass``, sigmoid per label for ``multilabel``, after dividing the
    logits by the run's temperature.
    """

    def __init__(self, index: int, task: str, temperature: float = 1.0):
        self.index, self.task, self.temperature = index, task, temperature

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        z = logits.float() / self.temperature
        p = torch.sigmoid(z) if self.task == "multilabel" else torch.softmax(z, dim=-1)
        return p[..., self.index]


class Explainer:
    """A CAM method attached to one layer of a classifier, as a context manager.

    Example::

        with Explainer(model, "multiclass", method="gradcam") as explainer:
            for x, classes in batches:
                heatmaps = explainer.heatmaps(x, classes)   # [B, H, W] in [0, 1]

    Args:
        model: a :class:`~cxrkit.models.classifier.Classifier` (fp32 weights; any memory format).
        task: ``binary``, ``multiclass`` or ``multilabel``.
        method: a key of :data:`METHODS`.
        layer: module path of the target layer; None for the backbone spec's ``cam_layer``.
        temperature: the run's temperature, for :meth:`probabilities`.
        score_batch_size: images per forward pass inside Score-CAM.
    """

    def __init__(self, model: nn.Module, task: str, method: str = "gradcam", layer: str | None = None,
                 temperature: float = 1.0, score_batch_size: int = 32):
        self.model, self.task, self.temperature = model, task, temperature
        self.class_name, self.uses_gradients, self.method_name = method_info(method)
        self.layer_name, self.layer = resolve_layer(model, layer)
        self.score_batch_size = score_batch_size
        self._cam: Any = None
        self._requires_grad: list[tuple[nn.Parameter, bool]] = []
        self._was_training = False
        self.grid_shape: tuple[int, int] | None = None

    def __enter__(self) -> Explainer:
        import pytorch_grad_cam

        self._was_training = self.model.training
        self._requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._requires_grad:
            p.requires_grad_(False)
        try:
            cls = getattr(pytorch_grad_cam, self.class_name)
            kwargs = {"model": self.model, "target_layers": [self.layer]}
            self._cam = cls(**kwargs)
            self._cam.compute_input_gradient = self.uses_gradients
            self._cam.batch_size = self.score_batch_size  # read by Score-CAM only
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._restore()  # returns None: an exception inside the block propagates

    def _restore(self) -> None:
        if self._cam is not None:
            self._cam.activations_and_grads.release()
            self._cam.outputs = None
            self._cam = None
        for p, flag in self._requires_grad:
            p.requires_grad_(flag)
        self._requires_grad = []
        self.model.train(self._was_training)

    @property
    def hooks_open(self) -> int:
        """Hooks this explainer holds on the model (0 once it is closed)."""
        return len(self._cam.activations_and_grads.handles) if self._cam is not None else 0

    def heatmaps(self, images: torch.Tensor, classes: Sequence[int]) -> np.ndarray:
        """One map per image for its class index, ``[B, H, W]`` float32 scaled to [0, 1] per image.

        Raises:
            CxrError: the explainer is not open, or the layer's output is not a 4-D feature map.
        """
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        if self._cam is None:
            raise CxrError("Explainer.heatmaps() needs an open explainer: use it in a `with` block")
        if len(classes) != len(images):
            raise CxrError(f"{len(images)} images but {len(classes)} target classes")
        targets = [ClassifierOutputTarget(int(c)) for c in classes]
        try:
            with _quiet_progress_bars():
                cams = self._cam(input_tensor=images, targets=targets)
            activations = self._cam.activations_and_grads.activations
            if activations:
                self.grid_shape = tuple(activations[0].shape[-2:])
        except ValueError as err:  # the package's message for a non-spatial layer output
            raise CxrError(f"layer {self.layer_name} of {self.model.spec_name} gives no 2-D feature map to "
                           f"explain ({err}); name a convolutional layer with --layer") from None
        finally:
            self._cam.activations_and_grads.clear()
            self._cam.outputs = None  # holds the retained autograd graph until the next call otherwise
        return np.nan_to_num(np.asarray(cams, dtype=np.float32), nan=0.0)

    @torch.no_grad()
    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        """Calibrated probabilities ``[B, outputs]`` for the same fp32 forward pass the maps explain."""
        logits = self.model(images).float() / self.temperature
        p = torch.sigmoid(logits) if self.task == "multilabel" else torch.softmax(logits, dim=-1)
        return p.cpu().numpy()


@contextlib.contextmanager
def _quiet_progress_bars() -> Any:
    """Score-CAM prints a tqdm bar per image to stderr; keep it out of the user's terminal."""
    with muted("stderr"):
        yield


def choose_targets(task: str, labels: Sequence[str], probs: np.ndarray, threshold: float | None,
                   requested: Sequence[str] = ()) -> list[list[int]]:
    """Which outputs to explain for each image.

    By default the predicted class (binary: the positive class when it is over the run's threshold, else the
    other; multiclass: the most probable), and for multilabel every label over the threshold (the most probable
    when none is). ``requested`` names classes explicitly, or is ``["all"]`` for every output.
    """
    if requested:
        if list(requested) == ["all"]:
            return [list(range(len(labels))) for _ in probs]
        found = [find_label(r, labels) for r in requested]  # by name, without case, as everywhere
        if unknown := [r for r, i in zip(requested, found) if i is None]:
            raise CxrError(f"unknown target {', '.join(unknown)}; the run's labels are {', '.join(labels)} (or all)")
        return [[i for i in found if i is not None] for _ in probs]
    cut = 0.5 if threshold is None else threshold
    if task == "binary":
        return [[int(p[1] >= cut)] for p in probs]
    if task == "multilabel":
        return [[i for i, q in enumerate(p) if q >= cut] or [int(np.argmax(p))] for p in probs]
    return [[int(np.argmax(p))] for p in probs]


__all__ = ["METHODS", "Explainer", "ProbabilityTarget", "choose_targets", "method_info"]
