"""Comparison specs: one base recipe, a matrix of axes, and one cell (a full recipe) per combination of values.

A spec is YAML::

    name: pretrained-vs-scratch          # folder under the output directory (default: the file's stem)
    description: what the comparison asks
    recipe: recipes/pneumonia-mobilenetv2.yaml   # the base recipe (optional; default: the recipe defaults)
    set: ["model.image_size=160"]        # overrides for every cell (optional)
    matrix:                              # the axes; the cells are their cartesian product, in the order written
      backbone: [mobilenet_v2, tf_efficientnet_lite0]   # shorthand for model.backbone
      weights: [imagenet, none]                         # shorthand for model.weights
      strategy:                                         # a mapping: named override sets
        feature-extraction: {stages: [{name: head, trainable: head, epochs: 5, lr: 1.0e-3}]}
        finetune-top2: ["stages.1.trainable=top:2:blocks", "stages.1.epochs=3"]
      seed: [0, 1]                                      # shorthand for seed (not data.split.seed: the split stays)
      stages.1.trainable: [from:features.denseblock4, from:features.denseblock3]   # any dotted recipe key
    evaluate: {split: test, checkpoint: best, batch_size: 64}
    sort: test_auc                       # leaderboard order, best first (one of SORT_KEYS)
    out: runs/compare                    # default output directory (``cxr compare --out`` wins)

An axis given as a list sets one recipe key per value: the shorthands ``backbone``, ``weights``, ``seed`` and
``image_size`` (``model.image_size``) or any dotted recipe key. An axis given as a mapping is a set of named
override sets; its name is free (``strategy``, ``cutoff``, ``optimizer`` ...). ``set`` and every override set are
either ``key=value`` strings (values are YAML, as for ``cxr train --set``) or a mapping of recipe keys to values, in
which nested mappings merge key by key (``{model: {image_size: 160}}`` changes the size alone) while lists and
scalars replace (``{stages: [...]}`` replaces every stage; stage entries start from the stage defaults) and keys
may be dotted (``{stages.1.lr: 1.0e-4}``). Overrides apply in order: base recipe, ``set``, the axes as written
(a later axis wins on a key two axes set), then ``cxr compare --set``.

Cell ids join the axes' value labels with ``-`` (``mobilenet_v2-imagenet-feature-extraction-s0``); seeds read
``s<seed>`` and image sizes ``<size>px``. Unknown keys, wrong types and cells whose recipes do not resolve are
:class:`~cxrkit.errors.CxrError` s that name the key or the cell, before anything trains.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cxrkit.config import (
    Recipe,
    load_recipe,
    load_yaml,
    not_a_file,
    parse_overrides,
    recipe_from_dict,
    yaml_problem,
)
from cxrkit.errors import CxrError
from cxrkit.models.backbones import BACKBONES

SHORTHANDS = {"backbone": "model.backbone", "weights": "model.weights", "seed": "seed",
              "image_size": "model.image_size"}
SPEC_KEYS = ("name", "description", "recipe", "set", "matrix", "evaluate", "sort", "out")
EVALUATE_KEYS = ("split", "checkpoint", "batch_size")
SORT_KEYS = ("test_auc", "test_accuracy", "test_f1_macro", "checkpoint_val_auc", "checkpoint_val_accuracy",
             "first_epoch_val_accuracy")
# sort keys that were renamed: best_val_accuracy was the highest val accuracy of any epoch, not the evaluated one's
RENAMED_SORT_KEYS = {"best_val_accuracy": "checkpoint_val_accuracy"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")

Pairs = list[tuple[str, Any]]


@dataclass(frozen=True)
class AxisValue:
    """One value of an axis: how it reads in a table (``label``), in a cell id (``slug``) and what it sets."""

    label: str
    slug: str
    overrides: tuple[tuple[str, Any], ...]


@dataclass
class Axis:
    """One axis of the matrix; ``key`` is the recipe key of a list axis, None for named override sets."""

    name: str
    values: list[AxisValue]
    key: str | None = None


@dataclass
class EvaluateSpec:
    """How every cell is evaluated once trained (``cxrkit.eval.evaluate.evaluate_run``)."""

    split: str = "test"
    checkpoint: str = "best"
    batch_size: int = 64


@dataclass
class ComparisonSpec:
    """A parsed comparison: the base recipe (resolved, as a mapping), common overrides and the axes."""

    name: str
    path: Path | None = None
    description: str = ""
    recipe: Path | None = None
    base: dict[str, Any] = field(default_factory=dict)
    set: Pairs = field(default_factory=list)
    matrix: list[Axis] = field(default_factory=list)
    overrides: Pairs = field(default_factory=list)
    evaluate: EvaluateSpec = field(default_factory=EvaluateSpec)
    sort: str = "test_auc"
    out: str = "runs/compare"

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec, JSON-ready (for ``comparison.json``)."""
        return {
            "name": self.name, "path": str(self.path) if self.path else None, "description": self.description,
            "recipe": str(self.recipe) if self.recipe else None, "set": [[k, v] for k, v in self.set],
            "matrix": [{"name": a.name, "key": a.key, "values": [
                {"label": v.label, "slug": v.slug, "overrides": [[k, x] for k, x in v.overrides]} for v in a.values
            ]} for a in self.matrix],
            "overrides": [[k, v] for k, v in self.overrides], "evaluate": dataclasses.asdict(self.evaluate),
            "sort": self.sort, "out": self.out,
        }


@dataclass
class Cell:
    """One combination of axis values: their labels, what they set (``overrides``, after the spec's ``set``) and
    the recipe the cell resolves to."""

    id: str
    labels: dict[str, str]
    overrides: Pairs
    recipe: Recipe
    skipped: tuple[str, ...] = ()  # command-line overrides of a stage this cell does not have

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "axes": self.labels, "overrides": [[k, v] for k, v in self.overrides]}


def _unknown(kind: str, key: Any, known: tuple[str, ...], where: str) -> CxrError:
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; known keys: {', '.join(known)}"
    return CxrError(f"unknown {kind} key {key!r} in {where}{hint}")


def slug(value: Any) -> str:
    """A readable, file-name-safe rendering of an axis value (``from:features.denseblock4`` ->
    ``from-features.denseblock4``; a negative number ``-1`` -> ``neg1``, not ``1``)."""
    text = "none" if value is None else str(value) if not isinstance(value, (dict, list)) else yaml.safe_dump(
        value, default_flow_style=True, width=1000).strip()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        text = "neg" + text.removeprefix("-")
    return re.sub(r"[^A-Za-z0-9._]+", "-", str(text)).strip("-.") or "x"


def flatten(mapping: dict[str, Any], prefix: str = "") -> Pairs:
    """``{model: {image_size: 160}}`` -> ``[("model.image_size", 160)]``; lists and scalars are leaves."""
    pairs: Pairs = []
    for key, value in mapping.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            pairs += flatten(value, dotted)
        else:
            pairs.append((dotted, value))
    return pairs


def override_pairs(value: Any, where: str) -> Pairs:
    """An override set (``key=value`` strings, one such string, or a mapping of recipe keys) as ordered pairs."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if isinstance(value, dict):
        return flatten(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        try:
            return parse_overrides(value)
        except CxrError as err:
            raise CxrError(f"{where}: {err}") from None
    raise CxrError(f"{where}: expected key=value strings or a mapping of recipe keys, got {value!r}")


def _parse_axis(name: Any, values: Any, where: str) -> Axis:
    name = str(name)
    if isinstance(values, dict):
        if not values:
            raise CxrError(f"{where}: matrix axis {name} has no values")
        items = [AxisValue(str(label), slug(label), tuple(override_pairs(sets, f"{where}: matrix.{name}.{label}")))
                 for label, sets in values.items()]
        return Axis(name, items)
    if not isinstance(values, list) or not values:
        raise CxrError(f"{where}: matrix axis {name} must be a non-empty list of values or a mapping of named "
                       f"override sets, got {values!r}")
    key = SHORTHANDS.get(name, name)
    top_level = tuple(f.name for f in dataclasses.fields(Recipe))
    if "." not in key and key not in top_level:  # backbonee: a shorthand misspelt, not an unknown recipe key
        close = difflib.get_close_matches(name, [*SHORTHANDS, *top_level], n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise CxrError(f"{where}: matrix axis {name!r} is not a shorthand ({', '.join(SHORTHANDS)}) or a recipe key"
                       f"{hint}")
    items = []
    for value in values:
        label = "none" if value is None else str(value)
        text = f"s{value}" if name == "seed" else f"{value}px" if name == "image_size" else value
        items.append(AxisValue(label, slug(text), ((key, value),)))
    return Axis(name, items, key)


def resolve_recipe_path(recipe: str, spec_path: Path | None) -> Path:
    """The base recipe: absolute, or relative to the spec's folder or one of its parents (so specs in
    ``comparisons/`` may name ``recipes/x.yaml`` from the repository root), or to the working directory."""
    path = Path(os.path.expanduser(recipe))
    if path.is_absolute():
        candidates = [path]
    else:
        folders = [spec_path.resolve().parent, *spec_path.resolve().parent.parents] if spec_path else []
        candidates = [folder / path for folder in folders] + [Path.cwd() / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    where = f"next to {spec_path} or in a parent folder" if spec_path else "in the working directory"
    raise CxrError(f"recipe {recipe} does not exist (looked {where} and in {Path.cwd()})")


def _parse_evaluate(value: Any, where: str) -> EvaluateSpec:
    if value is None:
        return EvaluateSpec()
    if not isinstance(value, dict):
        raise CxrError(f"{where}: evaluate must be a mapping like {{split: test}}, got {value!r}")
    for key in value:
        if key not in EVALUATE_KEYS:
            raise _unknown("evaluate", key, EVALUATE_KEYS, where)
    spec = EvaluateSpec(**value)
    if spec.split not in ("train", "val", "test") or spec.checkpoint not in ("best", "last"):
        raise CxrError(f"{where}: evaluate.split must be train, val or test and evaluate.checkpoint best or last")
    if not isinstance(spec.batch_size, int) or spec.batch_size < 1:
        raise CxrError(f"{where}: evaluate.batch_size must be a positive integer")
    return spec


def comparison_from_dict(data: dict[str, Any], path: Path | None = None, overrides: list[str] | None = None,
                         default_name: str = "comparison") -> ComparisonSpec:
    """Parse and check a spec mapping; ``overrides`` (``key=value``, from ``--set``) apply to every cell last."""
    where = str(path) if path else "comparison spec"
    for key in data:
        if key not in SPEC_KEYS:
            raise _unknown("comparison", key, SPEC_KEYS, where)
    name = str(data.get("name") or default_name)
    if not _NAME.match(name):
        raise CxrError(f"{where}: name {name!r} must be a folder name (letters, digits, '.', '_', '-')")
    matrix = data.get("matrix") or {}
    if not isinstance(matrix, dict):
        raise CxrError(f"{where}: matrix must be a mapping of axis names to values, got {matrix!r}")
    recipe = resolve_recipe_path(str(data["recipe"]), path) if data.get("recipe") else None
    sort = str(data.get("sort", "test_auc"))
    if sort in RENAMED_SORT_KEYS:
        raise CxrError(f"{where}: sort {sort!r} is now {RENAMED_SORT_KEYS[sort]!r}: the val score of the epoch whose "
                       "checkpoint is evaluated (the best of any epoch was another epoch's)")
    if sort not in SORT_KEYS:
        raise CxrError(f"{where}: sort {sort!r} is not one of {', '.join(SORT_KEYS)}")
    return ComparisonSpec(
        name=name, path=path, description=str(data.get("description") or ""), recipe=recipe,
        base=load_recipe(recipe).to_dict(), set=override_pairs(data.get("set"), f"{where}: set"),
        matrix=[_parse_axis(k, v, where) for k, v in matrix.items()], overrides=override_pairs(overrides, "--set"),
        evaluate=_parse_evaluate(data.get("evaluate"), where), sort=sort, out=str(data.get("out") or "runs/compare"),
    )


def load_comparison(path: str | Path, overrides: list[str] | None = None) -> ComparisonSpec:
    """Read a comparison spec from YAML and check it (see the module docstring for the format)."""
    path = Path(path)
    if not path.is_file():
        raise CxrError(f"comparison spec {path} {not_a_file(path)}")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise CxrError(f"comparison spec {path} is not UTF-8 text (byte {err.start}); save it as UTF-8 YAML") from None
    except yaml.YAMLError as err:
        raise CxrError(f"comparison spec {path} is not valid YAML: {yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise CxrError(f"comparison spec {path} must be a mapping of keys to values")
    return comparison_from_dict(data, path, overrides, default_name=path.stem)


def apply_pairs(data: dict[str, Any], pairs: Pairs) -> dict[str, Any]:
    """A deep copy of the recipe mapping ``data`` with dotted ``pairs`` set in order."""
    from cxrkit.config import apply_overrides  # the one implementation of dotted keys (lists, stage appends)

    return apply_overrides(copy.deepcopy(data), copy.deepcopy(pairs))


def _stage_overrides_that_fit(pairs: Pairs, stages: int) -> tuple[Pairs, tuple[str, ...]]:
    """The command-line ``pairs`` a cell with ``stages`` stages takes, and those it skips: a key of a stage past its
    last (``--set stages.1.epochs=1`` shortens the pretrained cells' fine-tuning; a from-scratch cell with one stage
    has none to shorten). A stage given its ``trainable`` and ``epochs`` there is added to every cell instead."""
    def index(key: str) -> int | None:
        parts = key.split(".")
        return int(parts[1]) if len(parts) > 2 and parts[0] == "stages" and parts[1].isdigit() else None

    added = {i for i in {index(k) for k, _ in pairs} - {None}
             if {f"stages.{i}.trainable", f"stages.{i}.epochs"} <= {k for k, _ in pairs}}
    kept = [(k, v) for k, v in pairs if index(k) is None or index(k) < stages or index(k) in added]
    return kept, tuple(f"{k}={v}" for k, v in pairs if (k, v) not in kept)


def expand_cells(spec: ComparisonSpec) -> list[Cell]:
    """Every combination of the axes' values, each with its resolved, checked recipe."""
    where = str(spec.path) if spec.path else "comparison spec"
    cells: list[Cell] = []
    for combo in itertools.product(*(axis.values for axis in spec.matrix)):
        cell_id = "-".join(v.slug for v in combo) or "base"
        labels = {axis.name: value.label for axis, value in zip(spec.matrix, combo)}
        overrides = [pair for value in combo for pair in value.overrides]
        try:
            data = apply_pairs(spec.base, [*spec.set, *overrides])
            kept, skipped = _stage_overrides_that_fit(spec.overrides, len(data.get("stages") or []) or 1)
            data = apply_pairs(data, [*kept, ("name", f"{spec.name}-{cell_id}")])
            recipe = recipe_from_dict(data)
            BACKBONES.get(recipe.model.backbone)  # an unknown backbone fails here, not after the other cells trained
        except CxrError as err:
            raise CxrError(f"{where}: cell {cell_id}: {err}") from None
        cells.append(Cell(cell_id, labels, overrides, recipe, skipped))
    seen: dict[str, Cell] = {}
    for cell in cells:
        if cell.id in seen:
            raise CxrError(f"{where}: two cells are both named {cell.id} ({seen[cell.id].labels} and {cell.labels}); "
                           "give the values distinct names with a mapping axis")
        seen[cell.id] = cell
    return cells
