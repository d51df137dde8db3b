"""int8 quantization: ``--engine onnx-int8`` for predict, evaluate and serve, and ``cxr export -f onnx-int8``."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from cxrkit.cli.main import app
from cxrkit.errors import CxrError
from cxrkit.export.onnx import OnnxModel, read_metadata, update_metadata
from cxrkit.export.quantize import SETTINGS, quantize_int8
from cxrkit.serve.app import ServeSettings, create_app
from cxrkit.serve.predictor import Predictor


@pytest.fixture(scope="module")
def images(data):
    return sorted(str(p) for p in data.glob("*.png"))


def _op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def _train_size(run: Path) -> int:
    import csv

    with open(run / "splits.csv") as f:
        return sum(row["split"] == "train" for row in csv.DictReader(f))


def test_the_int8_engine_quantizes_once_with_its_own_calibration_and_answers_like_fp32(run, images, capsys):
    int8 = Predictor(run, engine="onnx-int8")
    path = run / "export" / "best.int8.onnx"
    assert int8.engine == "onnx-int8" and int8.model_id["engine"] == "onnx-int8"
    assert "quantizing the best checkpoint to int8 once" in capsys.readouterr().err
    ops = _op_types(path)
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # a quantized graph, not the fp32 one renamed
    int8_weights = [t for t in onnx.load(str(path)).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 10
    assert path.stat().st_size < 0.5 * (run / "export" / "best.onnx").stat().st_size

    meta = read_metadata(path)
    labels = json.loads((run / "labels.json").read_text())
    quantization = meta["quantization"]
    assert quantization["format"] == "QDQ" and quantization["range_split"] == "train"
    assert quantization["range_images"] == min(256, _train_size(run))
    calibration = quantization["calibration"]
    assert calibration["follows"] == {key: labels.get(key) for key in ("calibrated_on", "temperature", "threshold",
                                                                       "threshold_method")}
    assert calibration["threshold_method"] == labels["threshold_method"] and calibration["calibrated_on"] == "val"
    # the file's own threshold and temperature are what the engine uses and what it carries for other consumers
    assert meta["threshold"] == int8.threshold == calibration["threshold"]
    assert meta["temperature"] == int8.temperature == calibration["temperature"]
    assert meta["weights_sha256"] == int8.weights_sha256

    fp32 = Predictor(run, engine="onnx")
    raw8, raw32 = (p.model(p.runtime.to_device(_batch(p, images))).numpy() for p in (int8, fp32))
    assert not np.array_equal(raw8, raw32)  # int8 arithmetic, not the fp32 graph
    scale = np.abs(raw32).max()
    assert np.abs(raw8 - raw32).max() < 0.25 * scale  # close to fp32's logits
    assert _output_producer(path) == "Gemm"  # the logits are not rounded to 8 bits on the way out

    capsys.readouterr()
    stamp = path.stat().st_mtime_ns
    Predictor(run, engine="onnx-int8")  # reused as it is: no new quantization, no new fit
    assert path.stat().st_mtime_ns == stamp and "quantizing" not in capsys.readouterr().err


def _output_producer(path: Path) -> str:
    graph = onnx.load(str(path)).graph
    return next(node.op_type for node in graph.node if graph.output[0].name in node.output)


def _batch(predictor, images):
    import torch

    return torch.stack([predictor.transform(Image.open(p).convert("RGB")) for p in images])


def test_a_new_run_calibration_is_followed_without_quantizing_again(run):
    first = Predictor(run, engine="onnx-int8")
    assert first.temperature != 1.0  # the run has a fitted temperature, so the int8 model got its own
    path = run / "export" / "best.int8.onnx"
    graph = onnx.load(str(path)).graph.SerializeToString()
    labels_file = run / "labels.json"
    original = labels_file.read_text()
    try:
        labels = json.loads(original)
        labels["temperature"] = 1.0  # as `cxr calibrate --no-temperature` leaves it
        labels_file.write_text(json.dumps(labels))
        again = Predictor(run, engine="onnx-int8")
        calibration = read_metadata(path)["quantization"]["calibration"]
        assert calibration["follows"]["temperature"] == 1.0
        assert again.temperature == calibration["temperature"] == read_metadata(path)["temperature"] == 1.0
        assert onnx.load(str(path)).graph.SerializeToString() == graph  # same int8 weights and ranges
    finally:
        labels_file.write_text(original)
    assert Predictor(run, engine="onnx-int8").temperature == first.temperature  # back with the run's calibration


def test_evaluate_and_predict_with_the_int8_engine(run, images):
    result = CliRunner().invoke(app, ["evaluate", str(run), "--split", "train", "--name", "int8",
                                      "--engine", "onnx-int8"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "eval" / "int8" / "metrics.json").read_text())
    assert metrics["engine"] == "onnx-int8" and metrics["n"] > 0 and 0 <= metrics["auc"] <= 1
    result = CliRunner().invoke(app, ["predict", str(run), *images[:3], "--engine", "onnx-int8", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 3 and all(row["model"]["engine"] == "onnx-int8" for row in rows)
    threshold = read_metadata(run / "export" / "best.int8.onnx")["threshold"]
    assert all(row["threshold"] == threshold for row in rows)
    assert all(sum(row["probabilities"].values()) == pytest.approx(1, abs=1e-4) for row in rows)


def test_the_service_answers_with_the_int8_engine(run, images):
    with TestClient(create_app(ServeSettings(str(run), engine="onnx-int8"))) as client:
        assert client.get("/v1/health").json()["engine"] == "onnx-int8"
        answer = client.post("/v1/predict", files={"file": ("x.png", Path(images[0]).read_bytes(), "image/png")})
    assert answer.status_code == 200, answer.text
    assert answer.json()["model"]["engine"] == "onnx-int8"


def test_cxr_export_onnx_int8_writes_a_self_contained_file_and_compares_it_with_fp32(run, tmp_path):
    out = tmp_path / "model.int8.onnx"
    result = CliRunner().invoke(app, ["export", str(run), "-f", "onnx-int8", "-o", str(out),
                                      "--calibration-images", "4"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == str(out)
    assert "validation images, int8 and fp32 decide the same for" in result.stderr
    meta = read_metadata(out)
    assert meta["quantization"]["range_images"] == 4 and meta["labels"] == ["NORMAL", "PNEUMONIA"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])  # no cxrkit needed to run it
    logits = session.run(["logits"], {"image": np.zeros((3, 3, 48, 48), np.float32)})[0]  # the fp32 file's names
    assert logits.shape == (3, 2) and np.isfinite(logits).all()


def test_int8_without_the_training_images_is_a_one_line_error(run, tmp_path):
    moved = Path(shutil.copytree(run, tmp_path / run.name))
    shutil.rmtree(moved / "export")
    recipe = yaml.safe_load((moved / "recipe.yaml").read_text())
    recipe["data"]["root"] = str(tmp_path / "gone")
    (moved / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["evaluate", str(moved), "--engine", "onnx-int8"])
    assert result.exit_code != 0
    message = str(result.exception)
    assert message.startswith("int8 calibration reads the run's training images:") and "gone" in message
    assert len(message.splitlines()) == 1
    assert not (moved / "export" / "best.int8.onnx").exists()


def test_an_int8_file_is_in_place_only_once_its_calibration_is_fitted(run, tmp_path, monkeypatch):
    """The int8 file used to be written at its name first and given its own threshold and temperature after:
    a failure (or kill -9) in between left a file with the fp32 model's calibration, replacing the earlier one."""
    moved = Path(shutil.copytree(run, tmp_path / run.name))
    engine_file = moved / "export" / "best.int8.onnx"
    engine_file.unlink(missing_ok=True)
    out = tmp_path / "model.int8.onnx"
    out.write_bytes(b"the earlier export")

    def fails(*args, **kwargs):
        raise CxrError("the calibration failed")

    monkeypatch.setattr(Predictor, "_use_int8_calibration", fails)
    result = CliRunner().invoke(app, ["export", str(moved), "-f", "onnx-int8", "-o", str(out),
                                      "--calibration-images", "4"])
    assert result.exit_code != 0 and str(result.exception) == "the calibration failed"
    assert out.read_bytes() == b"the earlier export" and sorted(p.name for p in tmp_path.iterdir()) == [
        "model.int8.onnx", run.name]
    with pytest.raises(CxrError, match="the calibration failed"):
        Predictor(moved, engine="onnx-int8")
    assert sorted(p.name for p in (moved / "export").iterdir()) == ["best.onnx"]  # the fp32 source only


def test_zero_calibration_images_is_refused_not_read_as_the_default(run):
    result = CliRunner().invoke(app, ["export", str(run), "-f", "onnx-int8", "--calibration-images", "0"])
    assert result.exit_code == 2 and "--calibration-images" in result.output


def test_quantize_int8_refuses_no_images_and_a_file_that_is_not_a_model(tmp_path):
    with pytest.raises(CxrError, match="needs calibration images"):
        quantize_int8(tmp_path / "none.onnx", tmp_path / "out.onnx", iter([]), 0, {})
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    batches = iter([np.zeros((2, 3, 8, 8), np.float32)])
    with pytest.raises(CxrError, match="cannot quantize this model to int8") as err:
        quantize_int8(junk, tmp_path / "out.onnx", batches, 1, {})
    assert str(tmp_path / "out.onnx") in str(err.value) and not (tmp_path / "out.onnx").exists()


def _convs_with_int8_weights(path: Path) -> list[bool]:
    """For each Conv node in graph order: whether its weights come through a DequantizeLinear (int8) or are fp32."""
    graph = onnx.load(str(path)).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return [node.input[1] in dequantized for node in graph.node if node.op_type == "Conv"]


def test_cxr_export_keeps_the_first_convolutions_in_fp32_when_asked(run, tmp_path):
    out = tmp_path / "kept.int8.onnx"
    result = CliRunner().invoke(app, ["export", str(run), "-f", "onnx-int8", "-o", str(out),
                                      "--calibration-images", "4", "--fp32-convs", "3"])
    assert result.exit_code == 0, result.output
    assert "the first 3 convolutions kept in fp32" in result.stderr
    int8_weights = _convs_with_int8_weights(out)
    assert int8_weights[:3] == [False] * 3  # the stem stays fp32
    assert all(int8_weights[3:]) and len(int8_weights) > 10  # every later convolution is int8
    assert read_metadata(out)["quantization"]["fp32_convs"] == 3

    Predictor(run, engine="onnx-int8")  # the default file, quantized with none kept
    assert all(_convs_with_int8_weights(run / "export" / "best.int8.onnx"))
    assert read_metadata(run / "export" / "best.int8.onnx")["quantization"]["fp32_convs"] == 0


def test_an_impossible_number_of_fp32_convolutions_is_a_one_line_error(run, tmp_path):
    out = tmp_path / "bad.int8.onnx"
    result = CliRunner().invoke(app, ["export", str(run), "-f", "onnx-int8", "-o", str(out),
                                      "--calibration-images", "4", "--fp32-convs", "10000"])
    assert result.exit_code != 0 and isinstance(result.exception, CxrError)
    message = "cannot keep the first 10000 convolutions in fp32; the model has"
    assert str(result.exception).startswith(f"{out}: {message}")  # the file asked for, not its temporary name
    assert not out.exists() and list(tmp_path.iterdir()) == []
    result = CliRunner().invoke(app, ["export", str(run), "-f", "onnx-int8", "--fp32-convs", "-1"])
    assert result.exit_code == 2 and "--fp32-convs" in result.output  # refused before any work
    with pytest.raises(CxrError, match=r"cannot be negative \(-1\)"):  # the library refuses it too
        quantize_int8(run / "export" / "best.onnx", tmp_path / "x.onnx", iter([np.zeros((1, 3, 48, 48), np.float32)]),
                      1, {}, fp32_convs=-1)


def test_quantize_int8_can_keep_every_convolution_in_fp32(run, tmp_path):
    predictor = Predictor(run, engine="onnx")
    source = run / "export" / "best.onnx"
    total = len(_convs_with_int8_weights(source))
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((2, 3, 48, 48)).astype(np.float32) for _ in range(2)]
    every = quantize_int8(source, tmp_path / "all.onnx", iter(batches), 2, {"run": predictor.run.name},
                          fp32_convs=total)
    assert not any(_convs_with_int8_weights(every))


@pytest.mark.parametrize("low, hinted", [(1.01, True), (0.0, False)])
def test_cxr_export_suggests_fp32_convolutions_only_when_int8_disagrees_too_often(run, tmp_path, monkeypatch, low,
                                                                                   hinted):
    import cxrkit.export.run

    monkeypatch.setattr(cxrkit.export.run, "LOW_AGREEMENT", low)  # 1.01: any agreement is too low; 0: none is
    result = CliRunner().invoke(app, ["export", str(run), "-f", "onnx-int8", "-o", str(tmp_path / "m.int8.onnx"),
                                      "--calibration-images", "4"])
    assert result.exit_code == 0, result.output
    assert ("keeping the first convolutions in fp32 (--fp32-convs, now 0)" in result.stderr) is hinted


def test_int8_quantized_again_for_new_weights_keeps_the_fp32_convolutions(run):
    path = run / "export" / "best.int8.onnx"
    try:
        result = CliRunner().invoke(app, ["export", str(run), "-f", "onnx-int8", "--calibration-images", "4",
                                          "--fp32-convs", "2"])
        assert result.exit_code == 0, result.output
        update_metadata(path, {**read_metadata(path), "weights_sha256": "0" * 64})  # as if the weights had changed
        Predictor(run, engine="onnx-int8")
        meta = read_metadata(path)
        assert meta["weights_sha256"] != "0" * 64  # quantized again for the run's weights
        assert meta["quantization"]["fp32_convs"] == 2 and _convs_with_int8_weights(path)[:3] == [False, False, True]
        assert meta["quantization"]["range_images"] == 4  # as many images as before, not the default 256
    finally:
        path.unlink(missing_ok=True)  # later tests quantize the default file themselves


def test_an_int8_file_made_with_earlier_settings_is_quantized_again(run, capsys):
    path = run / "export" / "best.int8.onnx"
    try:
        result = CliRunner().invoke(app, ["export", str(run), "-f", "onnx-int8", "--calibration-images", "4",
                                          "--fp32-convs", "1"])
        assert result.exit_code == 0, result.output
        meta = read_metadata(path)
        # as written before ReLU outputs shared their concatenations' ranges
        earlier = {**meta["quantization"], "concatenations": "one range per concatenated group"}
        update_metadata(path, {**meta, "quantization": earlier})
        capsys.readouterr()
        Predictor(run, engine="onnx-int8")
        assert f"{path} was quantized with an earlier version's int8 settings\n" in capsys.readouterr().err  # one line
        quantization = read_metadata(path)["quantization"]
        assert quantization["concatenations"] == SETTINGS["concatenations"] and quantization["fp32_convs"] == 1
        assert quantization["range_images"] == 4 < _train_size(run)
        stamp = path.stat().st_mtime_ns
        Predictor(run, engine="onnx-int8")  # now current: used as it is
        assert path.stat().st_mtime_ns == stamp and "earlier" not in capsys.readouterr().err
    finally:
        path.unlink(missing_ok=True)


class _PreActivation(torch.nn.Module):
    """DenseNet's pattern in small: a BatchNormalization after a concatenation, so no convolution to fold into,
    then ReLU and a convolution whose output is concatenated to the features before it (a dense layer)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.norm = torch.nn.BatchNorm2d(16)
        self.conv = torch.nn.Conv2d(16, 8, 3, padding=1)
        self.head = torch.nn.Linear(24, 2)
        generator = torch.Generator().manual_seed(0)
        for norm in (self.stem[1], self.norm):  # statistics far from identity, as after training
            size = norm.num_features
            norm.running_mean.copy_(torch.randn(size, generator=generator))
            norm.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            norm.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
            norm.bias.data.copy_(torch.randn(size, generator=generator))

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, torch.nn.functional.max_pool2d(x, 3, 1, 1)], 1)
        x = torch.cat([x, self.conv(torch.relu(self.norm(x)))], 1)
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def preactivation(tmp_path_factory):
    """The fp32 export of :class:`_PreActivation` at 32 px, and calibration batches like its inputs."""
    from cxrkit.export.onnx import export_onnx

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the convolutions' and head's initial weights too: the same model in every run
        model = _PreActivation().eval()
    path = export_onnx(model, tmp_path_factory.mktemp("preact") / "m.onnx", 32, {})
    rng = np.random.default_rng(0)
    return path, [rng.standard_normal((8, 3, 32, 32)).astype(np.float32) for _ in range(4)]


def _conv_groups(path: Path) -> list[int]:
    graph = onnx.load(str(path)).graph
    convs = [node for node in graph.node if node.op_type == "Conv"]
    return [next((attribute.i for attribute in node.attribute if attribute.name == "group"), 1) for node in convs]


def test_a_batchnorm_after_no_convolution_is_quantized_as_a_depthwise_convolution(preactivation, tmp_path):
    source, batches = preactivation
    assert "BatchNormalization" in _op_types(source)
    out = quantize_int8(source, tmp_path / "m.int8.onnx", iter(batches), len(batches), {})
    assert "BatchNormalization" not in _op_types(out)
    assert _conv_groups(out) == [1, 16, 1]  # stem (its BatchNorm folded), the rewritten BatchNorm, conv
    assert all(_convs_with_int8_weights(out))
    assert read_metadata(out)["quantization"]["batchnorm"] == "depthwise 1x1 convolution where not folded"
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    fp32, int8 = OnnxModel(source)(x), OnnxModel(out)(x)
    assert (int8 - fp32).abs().max() < 0.05 * fp32.abs().max()


def test_the_logits_stay_fp32(preactivation, tmp_path):
    """A uint8 output takes at most 256 values, so 512 quantized logits would hold ties (and probabilities on a
    coarse grid, some exactly at a threshold); the classifier's matrix product is left in fp32 instead."""
    source, batches = preactivation
    out = quantize_int8(source, tmp_path / "m.int8.onnx", iter(batches), len(batches), {})
    assert read_metadata(out)["quantization"]["outputs"] == SETTINGS["outputs"]
    assert _output_producer(out) == "Gemm" and _output_producer(source) == "Gemm"
    x = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    fp32, int8 = OnnxModel(source)(x), OnnxModel(out)(x)
    assert len(np.unique(int8.numpy())) > 400  # it was at most 256
    assert (int8 - fp32).abs().max() < 0.05 * fp32.abs().max()


def test_the_rewritten_batchnorm_computes_what_the_batchnorm_did(preactivation, tmp_path):
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from cxrkit.export.quantize import _batchnorm_as_convs

    source, _ = preactivation
    quant_pre_process(str(source), str(tmp_path / "prepared.onnx"), skip_symbolic_shape=True)
    proto = onnx.load(str(tmp_path / "prepared.onnx"))
    assert _batchnorm_as_convs(proto.graph) == 1
    assert _batchnorm_as_convs(proto.graph) == 0  # nothing left to rewrite
    onnx.checker.check_model(proto)
    assert not any("running_" in tensor.name for tensor in proto.graph.initializer)  # the statistics are gone
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(OnnxModel(proto.SerializeToString())(x), OnnxModel(source)(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kept, fp32", [(1, [True, True, False]), (2, [True, True, True])])
def test_fp32_convolutions_count_the_model_s_own_and_keep_a_rewritten_batchnorm_inside_the_stem(
        preactivation, tmp_path, kept, fp32):
    source, batches = preactivation
    out = quantize_int8(source, tmp_path / "m.int8.onnx", iter(batches), len(batches), {}, fp32_convs=kept)
    assert [not int8 for int8 in _convs_with_int8_weights(out)] == fp32
    with pytest.raises(CxrError, match="cannot keep the first 3 convolutions in fp32; the model has 2"):
        quantize_int8(source, tmp_path / "x.onnx", iter(batches), len(batches), {}, fp32_convs=3)


def _concat_quantization(path: Path) -> list[tuple[list[tuple[float, int]], tuple[float, int]]]:
    """For each Concat of an int8 graph: the (scale, zero point) of each input's DequantizeLinear and of the
    QuantizeLinear of its output."""
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    values = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    consumers = {name: node for node in graph.node for name in node.input}

    def parameters(node):
        return float(values[node.input[1]]), int(values[node.input[2]])

    return [([parameters(producers[name]) for name in node.input], parameters(consumers[node.output[0]]))
            for node in graph.node if node.op_type == "Concat"]


def test_tensors_that_meet_in_a_concatenation_share_one_range_but_a_relu_keeps_its_own(preactivation, tmp_path):
    source, batches = preactivation
    out = quantize_int8(source, tmp_path / "m.int8.onnx", iter(batches), len(batches), {})
    assert read_metadata(out)["quantization"]["concatenations"] == SETTINGS["concatenations"]
    ((stem, pooled), first), (dense_inputs, dense_output) = _concat_quantization(out)
    # the dense layer's concatenation: the features before it, the new convolution's output and the result share
    # one scale and zero point (ONNX Runtime copies bytes), and that range holds the negative convolution outputs
    assert dense_inputs == [dense_output, dense_output] and dense_output == first and first[1] > 0
    # the stem's ReLU output and its max-pooling keep the ReLU's own range, zero point 0: ONNX Runtime removed
    # the ReLU and clips at that bound, which the shared range (below 0) would undo
    assert stem == pooled and stem[1] == 0 and stem != first
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    fp32, int8 = OnnxModel(source)(x), OnnxModel(out)(x)
    assert (int8 - fp32).abs().max() < 0.05 * fp32.abs().max()


class _Inception(torch.nn.Module):
    """GoogLeNet's pattern in small: branches that each end in a ReLU (one after a max-pooling), with ranges far
    apart, concatenated."""

    def __init__(self):
        super().__init__()
        self.branches = torch.nn.ModuleList(torch.nn.Conv2d(3, 4, k, padding=k // 2) for k in (1, 3, 1))
        for scale, branch in zip((1.0, 4.0, 0.25), self.branches):
            branch.weight.data.mul_(scale)
        self.head = torch.nn.Linear(12, 2)

    def forward(self, x):
        pooled = torch.nn.functional.max_pool2d(x, 3, 1, 1)
        x = torch.cat([torch.relu(self.branches[0](x)), torch.relu(self.branches[1](x)),
                       torch.relu(self.branches[2](pooled))], 1)
        return self.head(x.mean((2, 3)))


def test_relu_outputs_that_meet_in_a_concatenation_share_a_range_that_starts_at_zero(tmp_path):
    from cxrkit.export.onnx import export_onnx

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _Inception().eval()
    source = export_onnx(model, tmp_path / "m.onnx", 32, {})
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((8, 3, 32, 32)).astype(np.float32) for _ in range(4)]
    out = quantize_int8(source, tmp_path / "m.int8.onnx", iter(batches), len(batches), {})
    ((inputs, output),) = _concat_quantization(out)
    # every branch is quantized with the concatenation's own scale, and its zero point 0 still does the ReLU's
    # clipping (ONNX Runtime removed the ReLUs)
    assert inputs == [output] * 3 and output[1] == 0
    assert "Relu" not in _op_types(out)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    fp32, int8 = OnnxModel(source)(x), OnnxModel(out)(x)
    assert (int8 - fp32).abs().max() < 0.05 * fp32.abs().max()


def test_a_damaged_or_wrong_int8_file_is_named_and_quantized_again(run, capsys):
    """Both were quantized again with only "quantizing ... once" said, and an fp32 model in its place was called
    "quantized with an earlier version's int8 settings"."""
    path = run / "export" / "best.int8.onnx"
    Predictor(run, engine="onnx-int8")
    Predictor(run, engine="onnx")  # RUN/export/best.onnx
    for case, damage in (("damaged", lambda: path.write_bytes(path.read_bytes()[:5000])),
                         ("not an int8 model", lambda: shutil.copyfile(run / "export" / "best.onnx", path))):
        damage()
        capsys.readouterr()
        int8 = Predictor(run, engine="onnx-int8")
        err = " ".join(capsys.readouterr().err.split())
        assert f"{path} is {case}; quantizing again" in err and "earlier version" not in err
        assert int8.engine == "onnx-int8" and "quantization" in read_metadata(path)
