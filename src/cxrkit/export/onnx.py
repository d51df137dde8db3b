"""ONNX export of a run's model, and an ONNX Runtime session that stands in for the PyTorch model.

The graph takes ``image``, a float32 batch ``[N, 3, H, W]`` that is already preprocessed (resized, scaled to [0, 1]
and normalised with the mean and std in the metadata), and returns ``logits [N, labels]``. Everything needed to use
the file without cxrkit travels in its ``metadata_props`` as JSON values under ``cxrkit.*`` keys: labels, task,
preprocessing, threshold, temperature, the run and backbone, and the SHA-256 of the weights it holds.

Export uses ``torch.onnx.export(dynamo=True)``, PyTorch's supported exporter (the TorchScript one is deprecated),
with a dynamic batch dimension.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cxrkit.console import muted
from cxrkit.errors import CxrError, cannot_write, first_line, os_error
from cxrkit.export import fp32_copy
from cxrkit.runs import atomic_write_bytes, scratch_folder

INPUT = "image"
OUTPUT = "logits"
PREFIX = "cxrkit."


def export_onnx(model: nn.Module, path: str | Path, size: int, metadata: dict[str, Any]) -> Path:
    """Write ``model`` (fp32, eval mode) as ONNX with a dynamic batch dimension and ``metadata``; atomic.

    Args:
        model: the classifier; it is not modified (a float32 copy is exported).
        path: the ``.onnx`` file to write.
        size: input height and width.
        metadata: JSON-serialisable values stored as ``cxrkit.<key>``.
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    proto = export_graph(fp32_copy(model), size, OUTPUT, path, beside=path)
    set_metadata(proto, metadata)
    onnx.checker.check_model(proto)
    atomic_write_bytes(path, proto.SerializeToString())
    return path


def export_graph(module: nn.Module, size: int, output: str, name: str | Path, beside: Path | None = None) -> Any:
    """``module`` (already fp32 and in eval mode) as an ONNX ``ModelProto`` with input ``image`` (dynamic batch)
    and one output named ``output``; ``name`` is what an error message names. The exporter's file is written in a
    :func:`~cxrkit.runs.scratch_folder` beside the file ``beside`` (so on its disk), else in the system's temporary
    folder; a failed write there (a full disk) is ``<name>: cannot write (<reason>)``."""
    import onnx

    example = torch.zeros(2, 3, size, size)
    folder = scratch_folder(beside) if beside is not None else tempfile.TemporaryDirectory(prefix="cxrkit-export-")
    with folder as tmp:
        raw = Path(tmp) / "model.onnx"
        try:
            with muted("stdout"), torch.no_grad():  # the exporter's progress lines must not reach a piped result
                torch.onnx.export(module, (example,), str(raw), input_names=[INPUT], output_names=[output],
                                  dynamo=True, dynamic_shapes=({0: torch.export.Dim.DYNAMIC},),
                                  external_data=False, verbose=False)
            return _name_batch_dimension(onnx.load(str(raw)))
        except Exception as err:  # noqa: BLE001 - the exporter raises many types; all mean "cannot export"
            if (cause := os_error(err)) is not None:  # the exporter wraps a failed write of its file in its own error
                raise cannot_write(name, cause) from err
            raise CxrError(f"{name}: the model cannot be exported to ONNX: {first_line(err)}") from err


def _name_batch_dimension(proto: Any) -> Any:
    """Call the dynamic first dimension ``batch`` wherever it appears (the exporter names it after an internal
    symbol, such as ``s77``), as tools that show the model's inputs then do."""
    symbol = proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if not symbol:
        return proto
    for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = "batch"
    return proto


def set_metadata(proto: Any, metadata: dict[str, Any]) -> None:
    kept = [(p.key, p.value) for p in proto.metadata_props if not p.key.startswith(PREFIX)]
    del proto.metadata_props[:]
    for key, value in kept:
        proto.metadata_props.add(key=key, value=value)
    for key, value in sorted(metadata.items()):
        proto.metadata_props.add(key=PREFIX + key, value=json.dumps(value))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``cxrkit.*`` metadata of an exported file, decoded (without loading the weights)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file
        raise CxrError(f"{path}: not a readable ONNX model ({first_line(err)})") from None
    return {p.key[len(PREFIX):]: json.loads(p.value) for p in proto.metadata_props if p.key.startswith(PREFIX)}


def update_metadata(path: str | Path, metadata: dict[str, Any]) -> None:
    """Replace the ``cxrkit.*`` metadata of an exported file in place (atomic), keeping the graph."""
    import onnx

    proto = onnx.load(str(path))
    set_metadata(proto, metadata)
    atomic_write_bytes(path, proto.SerializeToString())


def session_options(threads: int | None = None) -> Any:
    """The ONNX Runtime session options of cxrkit's engines: ``threads`` intra-op threads (default: torch's), one
    inter-op thread, every graph optimization."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class OnnxModel(nn.Module):
    """An ONNX Runtime CPU session behind the ``nn.Module`` call, so prediction loops need no second branch.

    ``forward`` takes a preprocessed float batch (any memory format) and returns float32 logits on the CPU.
    """

    def __init__(self, path: str | Path | bytes, threads: int | None = None, output: str = OUTPUT):
        """``path`` is an ``.onnx`` file or a serialised model; ``output`` the graph output returned."""
        super().__init__()
        import onnxruntime as ort

        try:
            source = path if isinstance(path, bytes) else str(path)
            self.session = ort.InferenceSession(source, session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - ONNX Runtime raises its own exception types
            name = "the exported model" if isinstance(path, bytes) else path
            raise CxrError(f"{name}: ONNX Runtime cannot load this model ({first_line(err)})") from None
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run([self.output], {INPUT: batch})[0])

