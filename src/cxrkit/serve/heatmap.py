"""Grad-CAM pictures for the service and the web page, as PNG bytes.

Three pictures of the same size (the image, shrunk to ``max_side`` on its longest side): the image itself in
grey, the heatmap alone as a transparent colour layer over the part of the image the model saw, and the two
blended. A browser shows any input this way (DICOM and 16-bit TIFF included) and can stack the first two under
an opacity slider.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from PIL import Image


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def heatmap_layers(image: Image.Image, heatmap: np.ndarray, box: tuple[float, float, float, float],
                   max_side: int = 512, opacity: float = 0.45) -> dict[str, bytes]:
    """``image``, ``map`` (RGBA, transparent outside ``box``) and ``overlay`` PNGs.

    Args:
        image: the decoded image (PIL, any mode).
        heatmap: ``[h, w]`` in [0, 1] over the model input.
        box: ``(left, top, right, bottom)`` of ``image`` that the model input shows (see
            :func:`cxrkit.data.transforms.input_box`).
        max_side: longest side of the pictures.
        opacity: heatmap opacity in ``overlay``.
    """
    from matplotlib import colormaps

    scale = min(1.0, max_side / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    grey = image.convert("L").resize(size, Image.Resampling.LANCZOS)
    colours = (colormaps["jet"](np.clip(heatmap, 0, 1)) * 255).astype(np.uint8)  # [h, w, 4], alpha 255
    left, top, right, bottom = (round(v * scale) for v in box)
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    if right > left and bottom > top:
        patch = Image.fromarray(colours, "RGBA").resize((right - left, bottom - top), Image.Resampling.BILINEAR)
        layer.paste(patch, (left, top))
    faded = layer.copy()
    faded.putalpha(Image.fromarray((np.asarray(layer)[..., 3] * opacity).astype(np.uint8), "L"))
    overlay = Image.alpha_composite(grey.convert("RGBA"), faded).convert("RGB")
    return {"image": _png(grey), "map": _png(layer), "overlay": _png(overlay)}


def as_base64(layers: dict[str, bytes]) -> dict[str, Any]:
    """The PNGs as base64 strings under ``<name>_png``."""
    return {f"{name}_png": base64.b64encode(data).decode("ascii") for name, data in layers.items()}
