"""cxrkit as a Python library: calls leave the caller's process as they found it, take paths where a user would
give them, and refuse mistakes with one CxrError before any work."""

import random
import sys
import threading
import time

import numpy as np
import pytest
import torch
from synth import kermany_folder

from cxrkit.config import load_recipe
from cxrkit.errors import CxrError

TINY = [("model.backbone", "mobilenet_v3_small"), ("model.weights", "none"), ("model.image_size", 32),
        ("runtime.batch_size", 8), ("runtime.workers", 0), ("runtime.threads", 1), ("stages.0.epochs", 1),
        ("stages.1.trainable", "head"), ("stages.1.epochs", 1), ("data.split.ratios", [0.5, 0.25, 0.25])]


def _state():
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state(), torch.get_num_threads()


def _same(a, b):
    return a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) and a[3] == b[3]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained by ``train_recipe`` from a recipe file, with the caller's state before and after."""
    from cxrkit.train.api import train_recipe

    root = tmp_path_factory.mktemp("library")
    recipe = load_recipe(None, [("data.root", str(kermany_folder(root / "xray", per_class=12, size=32))),
                                ("out", str(root / "runs")), *TINY])
    (root / "tiny.yaml").write_text(recipe.to_yaml())
    torch.set_num_threads(2)
    random.seed(42), np.random.seed(42), torch.manual_seed(42)
    before = _state()
    run = train_recipe(str(root / "tiny.yaml"))
    return run, before, _state()


def test_training_leaves_the_callers_random_generators_and_thread_count_alone(trained):
    """It seeded Python's, NumPy's and torch's generators with the recipe's seed and left them so, and left
    PyTorch on the recipe's thread count."""
    _, before, after = trained
    assert before[3] == 2 and _same(before, after)


def test_a_predictor_leaves_the_callers_random_generator_and_thread_count_alone(trained):
    """Building the model drew its random initial weights from the caller's generator, and the run's training
    thread count became the process's."""
    from cxrkit.serve.predictor import Predictor

    run, _, _ = trained
    torch.set_num_threads(2)
    torch.manual_seed(7)
    before = _state()
    Predictor(run.path)
    assert _same(before, _state())


def test_runs_and_recipes_may_be_given_as_paths(trained, tmp_path):
    from cxrkit.eval.evaluate import evaluate_run
    from cxrkit.train.api import train_recipe

    run, _, _ = trained
    assert train_recipe(resume=str(run.path)).path == run.path  # complete: nothing to do
    metrics, folder = evaluate_run(str(run.path), name="given-as-a-path")
    assert folder == run.path / "eval" / "given-as-a-path" and metrics["n"] > 0
    with pytest.raises(CxrError, match="train_recipe needs a recipe or a run to resume, not neither"):
        train_recipe()
    with pytest.raises(CxrError, match="nowhere does not exist"):
        train_recipe(resume=tmp_path / "nowhere")


def test_calibration_options_are_refused_before_the_validation_split_is_predicted(trained, monkeypatch):
    from cxrkit.eval.calibrate import fit_calibration
    from cxrkit.serve.predictor import Predictor

    predictor = Predictor(trained[0].path)
    monkeypatch.setattr(predictor, "predict_dataset", lambda *a, **k: pytest.fail("predicted before refusing"))
    with pytest.raises(CxrError, match=r"^method 'bogus' is not youden or sensitivity$"):
        fit_calibration(predictor, method="bogus")
    with pytest.raises(CxrError, match=r"^target_sensitivity 1.5 is not in \(0, 1\]$"):
        fit_calibration(predictor, target_sensitivity=1.5)


def test_explain_options_take_one_target_as_a_name_and_refuse_bad_numbers():
    from cxrkit.explain.api import ExplainOptions

    assert ExplainOptions(targets="all").targets == ("all",)  # it was read letter by letter: "unknown target a, l"
    with pytest.raises(CxrError, match=r"^percent 150 must be above 0 and below 100 \(percent\)$"):
        ExplainOptions(percent=150)
    with pytest.raises(CxrError, match=r"^batch_size 0 must be at least 1$"):
        ExplainOptions(batch_size=0)
    with pytest.raises(CxrError, match="unknown CAM method 'gradcan'"):
        ExplainOptions(method="gradcan")


def test_explain_targets_are_matched_without_case():
    from cxrkit.explain.gradcam import choose_targets

    probs = np.array([[0.2, 0.9, 0.1]])
    assert choose_targets("multilabel", ["Edema", "Effusion", "Hernia"], probs, None, ["effusion", "EDEMA"]) == [[1, 0]]
    with pytest.raises(CxrError, match="unknown target edemaa"):
        choose_targets("multilabel", ["Edema", "Effusion", "Hernia"], probs, None, ["edemaa"])


def test_muting_a_library_s_output_keeps_other_threads_output(capsys):
    """ONNX export swapped sys.stdout for the whole process: another thread lost 597 of its 616 lines."""
    from cxrkit.console import muted

    def other():
        for i in range(20):
            print(f"other {i}")
            time.sleep(0.005)

    thread = threading.Thread(target=other)
    with muted("stdout"):
        thread.start()
        for _ in range(20):
            print("library progress")
            time.sleep(0.005)
        thread.join()
    print("after", file=sys.stdout)
    out = capsys.readouterr().out
    assert "library progress" not in out
    assert [line for line in out.splitlines() if line.startswith("other")] == [f"other {i}" for i in range(20)]
    assert out.endswith("after\n")


def test_one_path_is_one_image_and_paths_may_be_path_objects(trained, tmp_path):
    """A str was read letter by letter (43 'predictions' for one file), and a Path's prediction could not be turned
    into a dict."""
    from PIL import Image

    from cxrkit.explain.api import explain_files
    from cxrkit.serve.predictor import Predictor

    predictor = Predictor(trained[0].path)
    image = tmp_path / "one.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)).save(image)
    for given in (str(image), image, [image]):
        (result,) = list(predictor.predict_files(given))
        assert result.error is None and result.to_dict()["source"] == str(image)
    explained = explain_files(predictor, str(image), tmp_path / "maps")
    assert len(explained.rows) == 1 and not explained.failed


def test_images_in_memory_get_the_probabilities_their_files_get(trained, tmp_path):
    """A 16-bit array gave 0.7443 where its PNG gave 0.5446: arrays skipped the scaling files get."""
    from PIL import Image

    from cxrkit.serve.predictor import Predictor

    predictor = Predictor(trained[0].path)
    pixels = (np.random.default_rng(1).integers(0, 1200, (40, 40)) + 30000).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    from_file = next(iter(predictor.predict_files(tmp_path / "deep.png"))).probabilities
    expected = np.array([[from_file[n] for n in predictor.labels]])
    for given in (pixels, Image.open(tmp_path / "deep.png"), pixels.astype(np.float32), str(tmp_path / "deep.png")):
        np.testing.assert_allclose(predictor.predict_images([given]), expected, atol=1e-5)
    assert predictor.predict_images([]).shape == (0, len(predictor.labels))
    with pytest.raises(CxrError, match=r"^image 1: blank image \(every pixel is 7 of 255\)"):
        predictor.predict_images([pixels, np.full((40, 40), 7, np.uint8)])
    with pytest.raises(CxrError, match=r"^image 0: a colour array must be uint8"):
        predictor.predict_images([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(CxrError, match=r"^image 0: not an image but a dict"):
        predictor.predict_images([{}])
    with pytest.raises(CxrError, match=r"^image 0: image has zero size \(10x0\)"):
        predictor.predict_images([np.zeros((0, 10), np.uint8)])
    mask = np.zeros((40, 40), bool)
    mask[10:30, 10:30] = True
    Image.fromarray(mask).save(tmp_path / "mask.png")  # a 1-bit PNG
    from_file = next(iter(predictor.predict_files(tmp_path / "mask.png"))).probabilities
    np.testing.assert_allclose(predictor.predict_images([mask]), [[from_file[n] for n in predictor.labels]],
                               atol=1e-5)


def test_a_run_exports_from_python_with_the_commands_checks(trained, tmp_path):
    """The checked export lived in the command only: called from Python it failed on typer's defaults."""
    from cxrkit.export.onnx import read_metadata
    from cxrkit.export.run import export_run

    run, _, _ = trained
    path = export_run(str(run.path), output=tmp_path / "model.onnx")
    assert path == tmp_path / "model.onnx" and read_metadata(path)["labels"] == ["NORMAL", "PNEUMONIA"]
    with pytest.raises(CxrError, match=r"^format 'onnx16' is not one of onnx, onnx-int8, torchscript$"):
        export_run(run, "onnx16")


def test_recalibrating_from_python_brings_the_runs_exports_up_to_date(trained, tmp_path):
    """calibrate_run alone rewrites labels.json; the files in RUN/export kept the old threshold unseen."""
    import shutil

    from cxrkit.eval.calibrate import recalibrate
    from cxrkit.export.onnx import read_metadata
    from cxrkit.export.run import export_run

    run = shutil.copytree(trained[0].path, tmp_path / "run")
    exported = export_run(run)
    info = recalibrate(str(run), target_sensitivity=1.0)
    assert info["threshold_method"] == "sensitivity>=1"
    assert read_metadata(exported)["threshold"] == info["threshold"]
