"""Comparison specs: parsing, cells, overrides, clear errors; the shipped specs load. No training here."""

from pathlib import Path

import pytest
import yaml

from cxrkit.compare.spec import comparison_from_dict, expand_cells, load_comparison, slug
from cxrkit.errors import CxrError

from .helpers import write_spec

REPO = Path(__file__).resolve().parents[2]


def _cells(tmp_path, matrix, **extra):
    return expand_cells(load_comparison(write_spec(tmp_path / "specs", tmp_path / "data", matrix=matrix, **extra)))


def test_two_by_two_matrix_ids_and_overrides(tmp_path):
    cells = _cells(tmp_path, None)
    assert [c.id for c in cells] == ["head-only-s0", "head-only-s1", "two-stage-s0", "two-stage-s1"]
    two = cells[3].recipe
    assert [(s.trainable, s.epochs) for s in two.stages] == [("head", 1), ("all", 1)]
    assert two.stages[0].lr == pytest.approx(1e-3) and two.stages[1].lr == pytest.approx(1e-4)  # YAML 1e-3 floats
    assert cells[0].recipe.stages[0].lr == pytest.approx(1e-3)
    assert two.seed == 1 and two.data.split.seed == 0  # the seed axis never moves the split
    assert two.model.backbone == "mobilenet_v3_small" and two.model.image_size == 32
    assert cells[3].labels == {"strategy": "two-stage", "seed": "1"}


def test_shorthands_dotted_axes_and_mapping_merges(tmp_path):
    matrix = {
        "backbone": ["densenet121"], "weights": ["imagenet", "none"],
        "stages.1.trainable": ["from:features.denseblock4", "from:features.denseblock3"],
        "tweak": {"wide": {"model": {"hidden": [64]}, "stages.0.epochs": 2}},
    }
    with pytest.raises(CxrError, match=r"cell densenet121-imagenet-from-features.denseblock4-wide: override "
                                       r"stages.1.trainable: the recipe has 1 stage\(s\), .*also set stages.1.epochs"):
        _cells(tmp_path, matrix)  # it used to add a default 10-epoch stage around the cut-off alone
    from .helpers import TINY_SET

    cells = _cells(tmp_path, matrix, set=[*TINY_SET, "stages.1.epochs=1"])
    assert [c.id for c in cells] == [
        "densenet121-imagenet-from-features.denseblock4-wide", "densenet121-imagenet-from-features.denseblock3-wide",
        "densenet121-none-from-features.denseblock4-wide", "densenet121-none-from-features.denseblock3-wide",
    ]
    recipe = cells[1].recipe
    assert recipe.stages[1].trainable == "from:features.denseblock3" and recipe.stages[1].epochs == 1
    assert recipe.stages[0].epochs == 2 and recipe.model.hidden == [64]
    assert recipe.model.image_size == 32  # the nested mapping merged; it did not replace model


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"matrx": {}}, "unknown comparison key 'matrx'.*did you mean matrix"),
        ({"evaluate": {"splt": "test"}}, "unknown evaluate key 'splt'.*did you mean split"),
        ({"matrix": {"model.backbon": ["resnet18"]}}, "model.backbon; did you mean model.backbone"),
        ({"matrix": {"strategy": {"x": ["stages.0.trainable=top14"]}}}, "cell x: .*top:N"),
        ({"matrix": {"seed": []}}, "matrix axis seed must be a non-empty list"),
        ({"matrix": {"backbone": ["resnet18", "notanet"]}}, "cell notanet: unknown backbone 'notanet'"),
        ({"matrix": {"data.split.ratios": [[0.5, 0.6, 0.2]]}}, "recipe key data.split.ratios: .*summing to 1"),
        ({"sort": "speed"}, "sort 'speed' is not one of"),
        ({"sort": "best_val_accuracy"}, "sort 'best_val_accuracy' is now 'checkpoint_val_accuracy'"),
        # it listed the recipe's top-level keys, without the shorthand meant
        ({"matrix": {"backbonee": ["resnet18"]}}, r"matrix axis 'backbonee' is not a shorthand \(backbone, weights, "
                                                 r"seed, image_size\) or a recipe key; did you mean backbone\?$"),
        ({"recipe": "missing.yaml"}, "recipe missing.yaml does not exist"),
        ({"matrix": {"a": {"x-y": ["seed=1"], "x": ["seed=2"]}, "b": {"z": [], "y-z": []}}}, None),
    ],
)
def test_spec_mistakes_are_one_line_errors(tmp_path, change, message):
    base = yaml.safe_load(write_spec(tmp_path, tmp_path / "data").read_text())
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump({**base, **change}))
    if message is None:  # x-y + z and x + y-z: two cells with one id
        with pytest.raises(CxrError, match="two cells are both named x-y-z"):
            expand_cells(load_comparison(path))
        return
    with pytest.raises(CxrError, match=message) as err:
        expand_cells(load_comparison(path))
    assert "\n" not in str(err.value)


def test_recipe_path_is_found_from_a_parent_folder(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "r.yaml").write_text("name: r\nseed: 3\n")
    (tmp_path / "comparisons").mkdir()
    spec = tmp_path / "comparisons" / "c.yaml"
    spec.write_text("recipe: recipes/r.yaml\nmatrix: {seed: [4]}\n")
    monkeypatch.chdir(tmp_path / "comparisons")
    loaded = load_comparison(spec)
    assert loaded.name == "c" and loaded.recipe == tmp_path / "recipes" / "r.yaml"
    assert [c.id for c in expand_cells(loaded)] == ["s4"]


def test_no_matrix_is_one_base_cell():
    cells = expand_cells(comparison_from_dict({"name": "single"}))
    assert [c.id for c in cells] == ["base"]


@pytest.mark.parametrize("path", sorted((REPO / "comparisons").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_specs_resolve(path):
    spec = load_comparison(path)
    cells = expand_cells(spec)
    assert spec.name == path.stem and len(cells) >= 4
    assert len({c.recipe.data.split.seed for c in cells}) == 1
    assert all("${CXR_DATA_DIR}" in (c.recipe.data.root or str(c.recipe.data.sources)) for c in cells)


def test_a_spec_key_given_twice_is_refused(tmp_path):
    """Two ``set:`` lists in one spec: plain YAML kept the second only, so the first list's overrides vanished."""
    spec = write_spec(tmp_path, tmp_path / "data")
    spec.write_text(spec.read_text() + "set: [seed=3]\n" * 2)
    with pytest.raises(CxrError, match=r"not valid YAML: key 'set' appears twice \(lines \d+ and \d+\)"):
        load_comparison(spec)


def test_a_spec_path_that_is_a_folder_is_called_one(tmp_path):
    with pytest.raises(CxrError, match=r"^comparison spec \S+ is a folder, not a YAML file$"):  # "does not exist"
        load_comparison(tmp_path)


def test_negative_axis_values_keep_their_sign_in_cell_ids():
    """``-1`` used to become ``1`` (the minus was taken for a separator), so -1 and 1 gave cells of one name."""
    assert [slug(v) for v in (-1, 1, -0.5, 1e-5, "from:features.denseblock4", None)] == [
        "neg1", "1", "neg0.5", "1e-05", "from-features.denseblock4", "none"]


def test_a_command_line_set_of_a_missing_stage_is_skipped_by_that_cell_only(tmp_path):
    """`--set stages.1.epochs=1` shortens the fine-tuning of two-stage cells; a one-stage cell used to get a second
    stage added silently, and then the whole comparison was refused."""
    path = write_spec(tmp_path / "specs", tmp_path / "data")
    cells = {c.id: c for c in expand_cells(load_comparison(path, ["stages.1.epochs=2"]))}
    assert cells["two-stage-s0"].recipe.stages[1].epochs == 2 and cells["two-stage-s0"].skipped == ()
    assert len(cells["head-only-s0"].recipe.stages) == 1 and cells["head-only-s0"].skipped == ("stages.1.epochs=2",)
    added = {c.id: c for c in expand_cells(load_comparison(path, ["stages.1.epochs=1", "stages.1.trainable=all"]))}
    assert [s.trainable for s in added["head-only-s0"].recipe.stages] == ["head", "all"]  # a whole stage, for all
    assert added["head-only-s0"].skipped == ()
