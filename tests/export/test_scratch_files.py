"""Export and int8 quantization keep their intermediate files beside the file they make, on its disk, and a full disk
there is a one-line "cannot write" error that leaves nothing behind."""

import errno
import os
import tempfile
from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
from typer.testing import CliRunner

from cxrkit.cli.main import app
from cxrkit.errors import CxrError
from cxrkit.export.onnx import export_onnx, read_metadata

FULL = "No space left on device"


def _export(run: Path, out: Path, format_: str = "onnx"):
    extra = ["--calibration-images", "4"] if format_ == "onnx-int8" else []
    return CliRunner().invoke(app, ["export", str(run), "-f", format_, "-o", str(out), *extra])


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


@pytest.mark.parametrize("format_", ["onnx", "onnx-int8"])
def test_export_works_when_the_system_temporary_folder_cannot_be_used(run, tmp_path, monkeypatch, format_):
    """A nearly full TMPDIR made export fail, with a message naming the export's own file (whose disk had room)."""
    missing = tmp_path / "no-temporary-folder"
    monkeypatch.setenv("TMPDIR", str(missing))
    monkeypatch.setattr(tempfile, "tempdir", str(missing))  # what tempfile (ours and ONNX Runtime's) now uses
    out = tmp_path / "out" / ("model.int8.onnx" if format_ == "onnx-int8" else "model.onnx")
    result = _export(run, out, format_)
    assert result.exit_code == 0, result.output
    assert read_metadata(out)["labels"] == ["NORMAL", "PNEUMONIA"]
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # the intermediates went with their folder
    assert _hidden(run / "export") == []
    assert tempfile.tempdir == str(missing)  # the quantizer's setting was put back


def test_the_intermediate_file_is_beside_the_export_and_goes_on_ctrl_c(run, tmp_path, monkeypatch):
    seen = []

    def interrupted(module, args, f, **kwargs):
        seen.append(Path(f))
        Path(f).write_bytes(b"half a model")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.onnx, "export", interrupted)
    target = tmp_path / "export" / "best.onnx"
    with pytest.raises(KeyboardInterrupt):
        export_onnx(torch.nn.Conv2d(3, 2, 3), target, 16, {})
    assert seen[0].parent.parent == target.parent and seen[0].parent.name.startswith(f".best.onnx.{os.getpid()}.")
    assert list(target.parent.iterdir()) == []


@pytest.mark.parametrize("wrapped", [False, True], ids=["oserror", "wrapped-by-the-exporter"])
def test_a_full_disk_during_export_is_a_one_line_cannot_write_error(run, tmp_path, monkeypatch, wrapped):
    def full(module, args, f, **kwargs):
        Path(f).write_bytes(b"half a model")
        err = OSError(errno.ENOSPC, FULL)
        if not wrapped:
            raise err
        raise RuntimeError("Failed to export the model with torch.export") from err

    monkeypatch.setattr(torch.onnx, "export", full)
    out = tmp_path / "out" / "model.onnx"
    result = _export(run, out)
    assert isinstance(result.exception, CxrError), result.output
    assert str(result.exception) == f"{out}: cannot write ({FULL})"  # named as the file, not its .partial name
    assert list(out.parent.iterdir()) == []


def test_a_full_disk_during_quantization_is_one_line_without_onnx_runtime_s_traceback(run, tmp_path, monkeypatch,
                                                                                        caplog, capsys):
    """On a full disk ONNX Runtime's graph cleanup fails to save its output; the quantizer logs that with a
    traceback and goes on, and the next write fails."""
    from cxrkit.serve.predictor import Predictor

    Predictor(run).onnx_file(Predictor(run).model)  # the fp32 source, written while the disk has room
    cleanup = onnxruntime.InferenceSession

    def cannot_save(model, options=None, **kwargs):
        if options is not None and options.optimized_model_filepath:
            raise RuntimeError("[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Protobuf serialization failed.")
        return cleanup(model, options, **kwargs)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, FULL)

    monkeypatch.setattr(onnxruntime, "InferenceSession", cannot_save)
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", full)
    out = tmp_path / "out" / "model.int8.onnx"
    result = _export(run, out, "onnx-int8")
    assert isinstance(result.exception, CxrError), result.output
    assert str(result.exception) == f"{out}: cannot write ({FULL})"
    printed = result.output + capsys.readouterr().err + caplog.text
    assert "Optimization Failed" not in printed and "Traceback" not in printed
    assert list(out.parent.iterdir()) == [] and _hidden(run / "export") == []
