import pytest
import yaml

from cxrkit.config import Recipe, expand_path, load_recipe, load_yaml, recipe_from_dict
from cxrkit.errors import CxrError


def test_overrides_are_typed_and_dotted():
    recipe = recipe_from_dict(
        {"stages": [{"trainable": "head", "epochs": 10}, {"trainable": "top:14", "epochs": 20}]},
        ["stages.1.lr=1e-5", "data.root=/data/x", "loss.class_weights=[100, 1]", "model.hidden=[256, 64]"],
    )
    assert recipe.stages[1].lr == pytest.approx(1e-5)
    assert recipe.stages[1].trainable == "top:14"
    assert recipe.data.root == "/data/x"
    assert recipe.loss.class_weights == [100.0, 1.0]
    assert recipe.model.hidden == [256, 64]


def test_override_can_append_a_stage():
    recipe = recipe_from_dict({}, ["stages.1.trainable=all", "stages.1.epochs=2"])
    assert [s.trainable for s in recipe.stages] == ["head", "all"]


def test_an_emptied_stage_list_is_filled_only_by_whole_stages():
    recipe = recipe_from_dict({}, ["stages=[]", "stages.0.trainable=all", "stages.0.epochs=3", "stages.0.lr=1e-4"])
    assert [(s.trainable, s.epochs, s.lr) for s in recipe.stages] == [("all", 3, 1e-4)]
    with pytest.raises(CxrError, match=r"the recipe has 0 stage\(s\); to add stages.0, also set stages.0.trainable "
                                       r"and stages.0.epochs"):  # was: a default 10-epoch head stage, silently
        recipe_from_dict({}, ["stages=[]", "stages.0.lr=1e-4"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.rooot=x", "did you mean data.root"),
        ("stages.0.epochs=many", "stages.0.epochs"),
        ("stages.0.trainable=top14", "top:N"),
        ("stages.0.optimizer=lbfgs", "adam"),
        ("runtime.precision=int4", "runtime.precision"),
        ("runtime.cache_engine=tensorrt", "auto, torch, onnx"),
        ("loss.class_weights=heavy", "balanced"),
        ("loss.class_weights=[-1, 1]", r"must be finite and not negative, and not all 0"),  # trained to a loss < 0
        ("loss.class_weights=[0, 0]", r"must be finite and not negative, and not all 0"),  # NaN loss, traceback
        ("stages.0.early_stopping.patience=-1", "patience: -1 is negative"),
        ("model.hidden=[0]", r"recipe key model.hidden: \[0\] must be sizes of at least 1"),
        ("stages.1.lr=1e-5", r"override stages.1.lr: the recipe has 1 stage\(s\), stages.0 to stages.0 \(the "
                             r"training log counts them from 1\); to add stages.1, also set stages.1.trainable and "
                             r"stages.1.epochs"),
        ("novalue", "key=value"),
        ("runtime.threads=0", r"runtime.threads: 0 must be at least 1 \(leave it out"),  # was taken as the default
        ("runtime.threads=-2", "runtime.threads: -2 must be at least 1"),  # was a traceback from torch
        ("runtime.workers=-1", "runtime.workers: -1 must be at least 0"),  # was a traceback from the DataLoader
        ("runtime.eval_batch_size=0", "runtime.eval_batch_size: 0 must be at least 1"),
        ("stages.0.epochs=0", "every stage has 0 epochs"),
        ("runtime.threads=abc", "runtime.threads: 'abc' is not a whole number or null"),  # said "a int | None"
        ("model.backbone.name=x", r"model.backbone: \{'name': 'x'\} is not a string"),
        ("runtime.workers=true", "runtime.workers: true is not a whole number or null"),  # said Python's True
        ("runtime.eval_batch_size=1.5", "runtime.eval_batch_size: 1.5 is not a whole number"),
        ("stages.0.optimizer.lr=0.01", r"stages.0.optimizer is a value \('adam'\), not a group of keys"),  # traceback
        # each of these passed, then ended in a traceback from torch or torchvision (or trained at chance)
        ("stages.0.lr=.nan", r"^recipe key stages.0.lr: nan must be a positive number$"),
        ("stages.0.lr=.inf", r"^recipe key stages.0.lr: inf must be a positive number$"),
        ("stages.0.lr=-1e-3", r"^recipe key stages.0.lr: -0.001 must be a positive number$"),
        ("stages.0.epochs=-1", r"^recipe key stages.0.epochs: -1 is negative$"),
        ("stages.0.weight_decay=-1", r"^recipe key stages.0.weight_decay: -1 must be at least 0$"),
        ("stages.0.momentum=-1", r"^recipe key stages.0.momentum: -1 must be in \[0, 1\)$"),
        ("stages.0.gamma=0", r"^recipe key stages.0.gamma: 0 must be a positive number$"),
        ("stages.0.step_size=0", r"^recipe key stages.0.step_size: 0 must be at least 1 \(epochs\)$"),
        ("loss.label_smoothing=2", r"^recipe key loss.label_smoothing: 2 must be in \[0, 1\)$"),
        ("model.dropout=2", r"^recipe key model.dropout: 2 must be in \[0, 1\)$"),  # did not name the key
        ("augment.brightness=.nan", r"^recipe key augment.brightness: nan must be at least 0$"),
        ("augment.rotate=.inf", r"^recipe key augment.rotate: inf must be at least 0$"),
        ("augment.translate=3", r"^recipe key augment.translate: 3 must be a fraction of the image size, in \[0, "
                                r"1\]$"),  # was cut to 1 silently
        ("model.image_size=7", r"^recipe key model.image_size: 7 is outside 32 to 4096 pixels"),  # trained at chance
        ("model.image_size=100000", r"^recipe key model.image_size: 100000 is outside 32 to 4096 pixels"),  # 40 GB
    ],
)
def test_bad_keys_and_values_fail_clearly(override, message):
    with pytest.raises(CxrError, match=message):
        recipe_from_dict({}, [override])


def test_yaml_round_trip(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"stages": [{"lr": "1e-4", "trainable": "from:features.17"}]}))
    recipe = load_recipe(path)
    assert recipe.name == "r"
    assert recipe.stages[0].lr == pytest.approx(1e-4)
    again = tmp_path / "again.yaml"
    again.write_text(recipe.to_yaml())
    assert load_recipe(again).to_dict() == {**recipe.to_dict()}


def test_missing_and_invalid_recipe_files(tmp_path):
    with pytest.raises(CxrError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [unclosed")
    with pytest.raises(CxrError, match="not valid YAML"):
        load_recipe(bad)


@pytest.mark.parametrize(("text", "where"), [
    ("name: x\nstages:\n  - epochs: 1\n  lr: 2\n", r"line 4, column 3: expected <block end>, but found '\?'"),
    ("name: x\nmodel:\n\tbackbone: x\n", r"line 3, column 1: found character '\\t' that cannot start any token"),
])
def test_a_yaml_mistake_is_given_with_its_line_and_column(tmp_path, text, where):
    """Only PyYAML's context was said (``while parsing a block collection``): not where, nor what."""
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(CxrError, match=rf"bad\.yaml is not valid YAML: {where}$"):
        load_recipe(tmp_path / "bad.yaml")


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path(__file__).parents[1].glob("recipes/*.yaml")))
def test_shipped_recipes_load(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe) and recipe.stages
    # a stage that judges its epochs by one metric while best.pt is chosen by another can lose its best epoch
    assert recipe.monitor_notes() == []


def test_monitor_notes_name_the_stages_that_judge_epochs_by_another_metric_than_best_pt():
    recipe = recipe_from_dict({"stages": [
        {"name": "head", "trainable": "head", "early_stopping": {"monitor": "val_auc", "restore_best": False}},
        {"name": "tune", "trainable": "all", "early_stopping": {"monitor": "val_auc", "patience": 3}},
        {"name": "keep", "trainable": "all", "early_stopping": {"monitor": "val_accuracy"}},
        {"name": "polish", "trainable": "all", "early_stopping": {"monitor": "val_loss", "patience": 3}},
    ]})
    # the head stage neither stops early nor restores its best epoch, so its monitor chooses nothing; the third
    # stage restores its best epoch by accuracy (restore_best is on by default)
    note = "stage {} ({}) judges its epochs by {} (early_stopping.monitor), but best.pt is chosen by {} " \
           "(runtime.checkpoint_monitor)"
    assert recipe.monitor_notes() == [note.format(2, "tune", "val_auc", "val_loss"),
                                      note.format(3, "keep", "val_accuracy", "val_loss")]
    agreed = recipe_from_dict(recipe.to_dict(), ["runtime.checkpoint_monitor=val_auc"])
    assert agreed.monitor_notes() == [note.format(3, "keep", "val_accuracy", "val_auc"),
                                      note.format(4, "polish", "val_loss", "val_auc")]


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    """Plain YAML keeps the last of two equal keys, so a second ``stages:`` silently replaced the first."""
    path = tmp_path / "twice.yaml"
    path.write_text("name: r\nstages:\n  - {name: a, epochs: 1}\nseed: 1\nstages:\n  - {name: b, epochs: 2}\n")
    with pytest.raises(CxrError, match=r"twice\.yaml is not valid YAML: key 'stages' appears twice "
                                       r"\(lines 2 and 5\); give it once$"):
        load_recipe(path)
    path.write_text("name: r\nmodel: {backbone: resnet18, backbone: densenet121}\n")
    with pytest.raises(CxrError, match=r"key 'backbone' appears twice \(line 2\)"):
        load_recipe(path)
    # merge keys are not duplicates, and a key the merge brings in may be overridden
    assert load_yaml("a: &x {p: 1, q: 1}\nb: {<<: *x, q: 2}\nc: {<<: *x}\n") == {
        "a": {"p": 1, "q": 1}, "b": {"p": 1, "q": 2}, "c": {"p": 1, "q": 1}}


def test_a_recipe_that_is_not_utf8_text_or_is_a_folder_is_named(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("name: r\u00e9sum\u00e9\n".encode("latin-1"))
    with pytest.raises(CxrError, match=r"latin1\.yaml is not UTF-8 text \(byte 7\)"):
        load_recipe(tmp_path / "latin1.yaml")
    with pytest.raises(CxrError, match=r"recipe .* is a folder, not a YAML file"):
        load_recipe(tmp_path)
    with pytest.raises(CxrError, match=r"^recipe /dev/null is not a regular file \(a device or a pipe\)$"):
        load_recipe("/dev/null")  # it said /dev/null did not exist


def test_augment_translate_of_1_and_image_sizes_at_the_limits_are_allowed():
    recipe = recipe_from_dict({}, ["augment.translate=1", "model.image_size=32"])
    assert recipe.augment.translate == 1 and recipe.model.image_size == 32
    assert recipe_from_dict({}, ["model.image_size=4096"]).model.image_size == 4096


def test_paths_expand_variables_and_home_or_say_why_not(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CXR_TEST_DIR", "/data")
    assert expand_path("~/runs", "out") == f"{tmp_path}/runs"
    assert expand_path("${CXR_TEST_DIR}/x", "out") == "/data/x"
    assert expand_path("/plain/price$", "out") == "/plain/price$"  # a dollar that names no variable
    monkeypatch.delenv("CXR_NO_SUCH_VAR", raising=False)
    assert expand_path("/runs/dollar$CXR_NO_SUCH_VAR", "out") == "/runs/dollar$CXR_NO_SUCH_VAR"  # a folder's name
    with pytest.raises(CxrError, match=r"^out \$\{CXR_NO_SUCH_VAR\}/runs: set the environment variable "
                                       r"CXR_NO_SUCH_VAR it names$"):
        expand_path("${CXR_NO_SUCH_VAR}/runs", "out")
    with pytest.raises(CxrError, match=r"^data root ~cxrnosuchuser/x: there is no user 'cxrnosuchuser'"):
        expand_path("~cxrnosuchuser/x", "data root")  # was Path.expanduser's RuntimeError, as a traceback


def test_a_mistake_inside_a_recipe_file_names_the_file(tmp_path):
    """``cxr train --resume RUN`` on a recipe.yaml edited by hand named the key but not the file."""
    path = tmp_path / "recipe.yaml"
    path.write_text("stages:\n  - epochs: many\n")
    with pytest.raises(CxrError, match=rf"^{path}: recipe key stages.0.epochs: 'many' is not a whole number$"):
        load_recipe(path)
    with pytest.raises(CxrError, match=r"^recipe key stages.0.lr: -1 must be a positive number$"):  # not the file's
        load_recipe(tmp_path / "recipe.yaml", ["stages.0.epochs=1", "stages.0.lr=-1"])
