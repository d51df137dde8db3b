"""Static int8 quantization of an exported model, for ONNX Runtime on CPUs where fp32 is the limit.

ONNX Runtime's post-training quantization (``onnxruntime.quantization.quantize_static``) turns the fp32 graph
written by :func:`cxrkit.export.onnx.export_onnx` into one whose convolutions and matrix products run in 8-bit
integers: weights int8 per output channel, activations uint8 per tensor, with ranges measured (min/max) on
calibration images that have gone through the run's own preprocessing. The file keeps the fp32 graph's input,
output and ``cxrkit.*`` metadata, plus ``cxrkit.quantization`` saying how it was made.

Settings are fixed rather than tuned: QDQ format (what ONNX Runtime fuses into integer kernels), per-channel
weights, and weights held to 7 bits (``reduce_range``), which ONNX Runtime recommends for x86 CPUs without VNNI,
where the 8-bit multiply can saturate. A BatchNormalization that does not follow a convolution (DenseNet's
pre-activation ``norm1``, which ONNX Runtime cannot fold into one) is first rewritten as the equal depthwise 1x1
convolution, so it runs in int8 too instead of between a DequantizeLinear and a QuantizeLinear in fp32, with layout
transposes around it. The tensors that meet in concatenations (DenseNet's dense blocks, GoogLeNet's inception
blocks) share one activation range, so that ONNX Runtime concatenates their bytes instead of requantizing every
input. The nodes that compute the outputs (the classifier's last matrix product) stay fp32, so the
logits are not rounded to 8 bits. One choice is left to the user,
``fp32_convs``: how many of the first convolutions stay in fp32. Most of int8's error comes from the early,
high-resolution layers, so keeping a few of them in fp32 buys back accuracy for part of the speed (measured in
``docs/performance.md``).

int8 changes the numbers, so it is never chosen automatically: check the run with
``cxr evaluate RUN --split val --engine onnx-int8`` against ``--engine onnx``. ``bench/inference.py`` measures
where it is faster; it is not everywhere.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing.util
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cxrkit.console import quiet_logger
from cxrkit.errors import CxrError, cannot_write, first_line, os_error
from cxrkit.export.onnx import INPUT, set_metadata
from cxrkit.runs import atomic_write_bytes, scratch_folder

CALIBRATION_IMAGES = 256
"""Default number of training images whose activations set the int8 ranges."""

SETTINGS = {"format": "QDQ", "weights": "int8 per channel, 7-bit range", "activations": "uint8 per tensor",
            "activation_ranges": "minmax", "batchnorm": "depthwise 1x1 convolution where not folded",
            "concatenations": "one range per concatenated group; ReLU outputs in it where its lower bound stays 0",
            "outputs": "fp32 (the node that computes each output is not quantized)"}
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


def _batchnorm_as_convs(graph: Any) -> int:
    """Rewrite each 4-D inference BatchNormalization of ``graph`` (one whose statistics are initializers) as the
    depthwise 1x1 Conv that computes the same: weight ``scale / sqrt(var + eps)``, bias ``B - mean * weight``.

    ONNX Runtime folds a BatchNormalization that follows a convolution into it; the ones left are those that
    follow something else (DenseNet's concatenations). Left as they are, the quantizer wraps each in fp32 between
    a DequantizeLinear and a QuantizeLinear, and ONNX Runtime adds layout transposes around it; as convolutions
    they run in int8 with the rest (a 1x1 depthwise weight is one value per channel, which per-channel int8 holds
    exactly). The node keeps its name. Returns how many were rewritten.
    """
    from onnx import helper, numpy_helper

    initializers = {tensor.name: tensor for tensor in graph.initializer}
    ranks = {value.name: len(value.type.tensor_type.shape.dim) for value in [*graph.value_info, *graph.input]}
    nodes, rewritten, statistics = [], 0, set()
    for node in graph.node:
        nodes.append(node)
        if (node.op_type != "BatchNormalization" or len(node.output) != 1 or ranks.get(node.input[0]) != 4
                or not all(name in initializers for name in node.input[1:5])):
            continue
        epsilon = next((attribute.f for attribute in node.attribute if attribute.name == "epsilon"), 1e-5)
        scale, shift, mean, var = (numpy_helper.to_array(initializers[name]).astype(np.float64)
                                   for name in node.input[1:5])
        weight = scale / np.sqrt(var + epsilon)
        name = node.name or f"{node.output[0]}.batchnorm"  # tensor names are unique in a graph; node names may be ""
        tensors = [numpy_helper.from_array(weight.reshape(-1, 1, 1, 1).astype(np.float32), f"{name}.weight"),
                   numpy_helper.from_array((shift - mean * weight).astype(np.float32), f"{name}.bias")]
        graph.initializer.extend(tensors)
        nodes[-1] = helper.make_node("Conv", [node.input[0], *(t.name for t in tensors)], list(node.output),
                                     name=name, group=len(weight), kernel_shape=[1, 1])
        rewritten += 1
        statistics.update(node.input[1:5])
    if not rewritten:
        return 0
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [tensor for tensor in graph.initializer if tensor.name in used or tensor.name not in statistics]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return rewritten


def _shared_concat_ranges(graph: Any, ranges: Any) -> dict[str, list[dict[str, np.float32]]]:
    """One activation range for every tensor that meets in a concatenation, as ONNX Runtime quantization
    overrides (``TensorQuantOverrides``): ``{tensor: [{"rmin": ..., "rmax": ...}]}``.

    A concatenation whose inputs all have its output's scale and zero point is a plain copy of bytes in ONNX
    Runtime's ``QLinearConcat``; with scales of their own, each input is requantized element by element. DenseNet
    concatenates every earlier layer's features before each layer, so each layer's output is an input to every
    later concatenation of its block: the tensors that must share a range are whole groups (connected through
    concatenations), and each group gets the union of its members' calibrated ranges (``ranges``, ONNX Runtime's
    ``TensorsData``). A pooling output is quantized with its input's parameters, so the group takes in that input
    too. ONNX Runtime removes a ReLU and lets the quantization's lower bound of 0 do its clipping, so a ReLU output
    (or a pooling of one) joins its group only where the union keeps that bound, as when every member is a ReLU's
    (GoogLeNet's and Inception's branches); where another member goes below 0, the ReLU outputs keep their own ranges
    and the others share theirs. A Clip output always keeps its own: a wider range would lose its upper bound too.
    Returns ``{}`` where the graph has no concatenation.
    """
    producers = {output: node for node in graph.node for output in node.output}
    parent: dict[str, str] = {}
    rectified: set[str] = set()  # ReLU outputs and the poolings of them

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    def source(name: str) -> str | None:
        """The tensor whose quantization ``name`` shares (itself, or a pooling's input), None if a Clip's."""
        producer = producers.get(name)
        if producer is not None and producer.op_type in ("MaxPool", "AveragePool"):
            return source(producer.input[0])
        return None if producer is not None and producer.op_type == "Clip" else name

    for node in graph.node:
        if node.op_type != "Concat":
            continue
        for name in node.input:
            if (shared := source(name)) is None:
                continue
            if (producer := producers.get(shared)) is not None and producer.op_type == "Relu":
                rectified.update((name, shared))
            for member in (name, shared):
                parent[root(member)] = root(node.output[0])
    groups: dict[str, list[str]] = {}
    for name in parent:
        if name in ranges.data:
            groups.setdefault(root(name), []).append(name)
    overrides = {}
    for members in groups.values():
        if min(ranges.data[name].range_value[0] for name in members) < 0:
            members = [name for name in members if name not in rectified]
        if not members:
            continue
        low = np.float32(min(ranges.data[name].range_value[0] for name in members))
        high = np.float32(max(ranges.data[name].range_value[1] for name in members))
        overrides.update({name: [{"rmin": low, "rmax": high}] for name in members})
    return overrides


@contextlib.contextmanager
def _temporary_files_in(folder: Path) -> Iterator[None]:
    """Make ``folder`` the temporary folder of :mod:`tempfile` while the block runs: ONNX Runtime's quantizer writes
    its intermediate models there and takes no folder of its own. The setting is the process's, so it is put back
    as soon as the block ends. The DataLoader workers that read the calibration images start inside the block and
    pass batches through sockets in :mod:`multiprocessing`'s own temporary folder, which is made first, in the
    system's: a socket's path in ``folder`` can be over the 107 characters a socket's path may have, and the
    workers then wait for ever."""
    with contextlib.suppress(OSError):  # made once per process, and inherited by forked workers
        multiprocessing.util.get_temp_dir()
    previous = tempfile.tempdir
    tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = previous


def _first_convs(graph: Any, own: list[str], count: int, path: Path) -> list[str]:
    """The Conv nodes of ``graph`` that stay fp32 when the first ``count`` of the model's own convolutions (``own``,
    in graph order, before BatchNormalizations became convolutions) do: those and every rewritten BatchNormalization
    before the next own convolution, so the fp32 stem has no int8 step inside it (and ``count = len(own)`` keeps
    every convolution fp32)."""
    if count > len(own):
        raise CxrError(f"{path}: cannot keep the first {count} convolutions in fp32; the model has {len(own)}")
    if count == 0:
        return []
    convs = [node.name for node in graph.node if node.op_type == "Conv"]
    return convs if count == len(own) else convs[:convs.index(own[count])]


_SHAPE_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Transpose"}


def _output_nodes(graph: Any) -> list[str]:
    """The nodes that compute the graph's outputs: each output's producer, and through shape-only steps (a Reshape
    after the last Gemm) the node that computes the values. Left out of quantization, they keep the logits in fp32:
    quantized, the logits would take about 256 values over their range, so probabilities would fall on a coarse
    grid (ties at a threshold), for no speed (the classifier's matrix product is a tiny share of the work)."""
    producer = {out: node for node in graph.node for out in node.output}
    names: list[str] = []
    for output in graph.output:
        node = producer.get(output.name)
        while node is not None and node.name and node.name not in names:  # an unnamed node cannot be excluded
            names.append(node.name)
            node = producer.get(node.input[0]) if node.op_type in _SHAPE_OPS and node.input else None
    return names


def quantize_int8(source: str | Path, path: str | Path, batches: Iterable[np.ndarray], count: int,
                  metadata: dict[str, Any], fp32_convs: int = 0) -> Path:
    """Write the int8 version of the fp32 ONNX file ``source`` to ``path`` (atomic).

    Args:
        source: an fp32 model exported by cxrkit.
        path: the file to write.
        batches: preprocessed calibration images, float32 ``[N, 3, H, W]``; consumed once.
        count: how many batches ``batches`` yields.
        metadata: the ``cxrkit.*`` metadata of the new file (``quantization`` is filled in here).
        fp32_convs: how many of the model's first convolutions (in graph order) stay in fp32; 0 quantizes all.

    Raises:
        CxrError: no calibration images, ``fp32_convs`` negative or more than the model's convolutions, or ONNX
            Runtime cannot quantize the graph.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, load_tensors_data, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    path = Path(path)
    if count < 1:
        raise CxrError(f"{path}: int8 quantization needs calibration images and got none")
    if fp32_convs < 0:
        raise CxrError(f"{path}: the number of convolutions kept in fp32 cannot be negative ({fp32_convs})")
    reader = _Batches(batches, count)
    # the quantizer notes on the root logger, for instance, each node it leaves in fp32; its intermediate files (and
    # ONNX Runtime's own, in the temporary folder) go beside the new file, on its disk
    with scratch_folder(path) as tmp, _temporary_files_in(tmp), quiet_logger():
        prepared, quantized = tmp / "prepared.onnx", tmp / "int8.onnx"
        try:
            # shape inference and graph cleanup first, as ONNX Runtime's quantization guide asks; a failed graph
            # cleanup is logged with its traceback and skipped, and what made it fail (a full disk) fails the next step
            with quiet_logger("onnxruntime.quantization.shape_inference", below=logging.CRITICAL + 1):
                quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            graph_proto = onnx.load(str(prepared))
            own = [node.name for node in graph_proto.graph.node if node.op_type == "Conv"]
            if _batchnorm_as_convs(graph_proto.graph):
                onnx.save(graph_proto, str(prepared))
            options = {"quant_format": QuantFormat.QDQ, "activation_type": QuantType.QUInt8,
                       "weight_type": QuantType.QInt8, "per_channel": True, "reduce_range": True,
                       "calibrate_method": CalibrationMethod.MinMax,
                       "calibration_cache_path": Path(tmp) / "ranges.json",
                       "nodes_to_exclude": _first_convs(graph_proto.graph, own, fp32_convs, path)
                       + _output_nodes(graph_proto.graph)}
            quantize_static(str(prepared), str(quantized), reader, **options, extra_options={"CalibStridedMinMax": 1})
            shared = _shared_concat_ranges(graph_proto.graph, load_tensors_data(options["calibration_cache_path"]))
            if shared:
                # again from the cached ranges (no second calibration), with one range per concatenated group
                quantize_static(str(prepared), str(quantized), None, **options,
                                extra_options={"TensorQuantOverrides": shared})
        except CxrError:
            raise
        except Exception as err:  # noqa: BLE001 - the quantizer raises many types; all mean "cannot quantize"
            if (cause := os_error(err)) is not None:  # a failed write of an intermediate file (a full disk)
                raise cannot_write(path, cause) from err
            raise CxrError(f"{path}: ONNX Runtime cannot quantize this model to int8: "
                           f"{first_line(err)}") from err
        proto = onnx.load(str(quantized))
    set_metadata(proto, {**metadata, "quantization": {**SETTINGS, **metadata.get("quantization", {}),
                                                       "range_images": reader.seen, "fp32_convs": fp32_convs}})
    onnx.checker.check_model(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, proto.SerializeToString())
    return path
