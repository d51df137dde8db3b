"""Static int8 quantization of an exported model, for ONNX Runtime on CPUs where fp32 is the limit.

ONNX Runtime's post-training quantization (``onnxruntime.quantization.quantize_static``) turns the fp32 graph
written by :func:`cxrkit.export.onnx.export_onnx` into one whose convolutions and matrix products run in 8-bit
integers: weights int8 per output channel, activations uint8 per tensor, with ranges measured (min/max) on
calibration images that have gone through the run's own preprocessing. The file keeps the fp32 graph's input,
output and ``cxrkit.*`` metadata, plus ``cxrkit.quantization`` saying how it was made.

Settings are fixed rather than tuned: QDQ format (what ONNX Runtime fuses into integer kernels), per-channel
weights, and weights held to 7 bits (``reduce_range``), which ONNX Runtime recommends for x86 CPUs without VNNI,
where the 8-bit multiply can saturate. One choice is left to the user, ``fp32_convs``: how many of the first
convolutions stay in fp32. Most of int8's error comes from the early, high-resolution layers, so keeping a few
of them in fp32 buys back accuracy for part of the speed (measured in ``docs/performance.md``).

int8 changes the numbers, so it is never chosen automatically: check the run with
``cxr evaluate RUN --split val --engine onnx-int8`` against ``--engine onnx``. ``bench/inference.py`` measures
where it is faster; it is not everywhere (on machine B, DenseNet-121 gained little over fp32 ONNX Runtime).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cxrkit.errors import CxrError
from cxrkit.export.onnx import INPUT, set_metadata
from cxrkit.runs import atomic_write_bytes

CALIBRATION_IMAGES = 256
"""Default number of training images whose activations set the int8 ranges."""

SETTINGS = {"format": "QDQ", "weights": "int8 per channel, 7-bit range", "activations": "uint8 per tensor",
            "activation_ranges": "minmax"}
"""What every int8 file records about how it was quantized (with ``range_images``, how many images set the
activation ranges, ``range_split``, where they came from, and ``fp32_convs``, how many leading convolutions stayed
in fp32)."""


class _Batches:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over ``count`` float batches ``[N, 3, H, W]``, read one
    batch per ``set_range`` window (``CalibStridedMinMax``), so the calibrator holds one batch's activations at a
    time and merges the ranges as it goes."""

    def __init__(self, batches: Iterable[np.ndarray], count: int):
        self._batches: Iterator[np.ndarray] = iter(batches)
        self._count = count
        self._left = 0
        self.seen = 0

    def __len__(self) -> int:
        return self._count

    def set_range(self, start_index: int, end_index: int) -> None:
        self._left = end_index - start_index

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None) if self._left > 0 else None
        if batch is None:
            return None
        self._left -= 1
        self.seen += len(batch)
        return {INPUT: np.ascontiguousarray(batch, dtype=np.float32)}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hold back the quantizer's warnings on the root logger (e.g. an "Axis 1 is out-of-range" line for each of
    DenseNet's BatchNormalization weights, which are not folded into a convolution); errors still show."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def _first_convs(model_path: Path, count: int, path: Path) -> list[str]:
    """The names of the first ``count`` Conv nodes of the graph, in its (topological, so forward) order."""
    import onnx

    convs = [node.name for node in onnx.load(str(model_path)).graph.node if node.op_type == "Conv"]
    if count > len(convs):
        raise CxrError(f"{path}: cannot keep the first {count} convolutions in fp32; the model has {len(convs)}")
    return convs[:count]


def quantize_int8(source: str | Path, path: str | Path, batches: Iterable[np.ndarray], count: int,
                  metadata: dict[str, Any], fp32_convs: int = 0) -> Path:
    """Write the int8 version of the fp32 ONNX file ``source`` to ``path`` (atomic).

    Args:
        source: an fp32 model exported by cxrkit.
        path: the file to write.
        batches: preprocessed calibration images, float32 ``[N, 3, H, W]``; consumed once.
        count: how many batches ``batches`` yields.
        metadata: the ``cxrkit.*`` metadata of the new file (``quantization`` is filled in here).
        fp32_convs: how many of the first convolutions (in graph order) stay in fp32; 0 quantizes all.

    Raises:
        CxrError: no calibration images, ``fp32_convs`` negative or more than the model's convolutions, or ONNX
            Runtime cannot quantize the graph.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path = Path(path)
    if count < 1:
        raise CxrError(f"{path}: int8 quantization needs calibration images and got none")
    if fp32_convs < 0:
        raise CxrError(f"{path}: the number of convolutions kept in fp32 cannot be negative ({fp32_convs})")
    reader = _Batches(batches, count)
    with tempfile.TemporaryDirectory(prefix="cxrkit-int8-") as tmp, _quiet():
        prepared, quantized = Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        try:
            # shape inference and graph cleanup first, as ONNX Runtime's quantization guide asks
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            excluded = _first_convs(prepared, fp32_convs, path)
            quantize_static(str(prepared), str(quantized), reader, quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            reduce_range=True, calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=excluded, extra_options={"CalibStridedMinMax": 1})
        except CxrError:
            raise
        except Exception as err:  # noqa: BLE001 - the quantizer raises many types; all mean "cannot quantize"
            raise CxrError(f"{path}: ONNX Runtime cannot quantize this model to int8: "
                           f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
        proto = onnx.load(str(quantized))
    set_metadata(proto, {**metadata, "quantization": {**SETTINGS, **metadata.get("quantization", {}),
                                                       "range_images": reader.seen, "fp32_convs": fp32_convs}})
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, proto.SerializeToString())
    return path
