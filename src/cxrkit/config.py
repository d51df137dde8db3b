"""Recipes: typed dataclasses loaded from YAML, with dotted ``--set key=value`` overrides.

A recipe says everything a run needs: the data, the model, the stages of training and the runtime. It is saved
resolved in the run directory (``recipe.yaml``) so a run can be evaluated, resumed and reproduced from it alone.
Unknown keys and wrong types fail with a message naming the key (and a close match).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from cxrkit.errors import CxrError, first_line

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
SCHEDULES = ("constant", "cosine", "step", "plateau")
MONITORS = ("val_loss", "val_accuracy", "val_auc")
_TRAINABLE = re.compile(r"^(head|all|top:\d+(:(layers|blocks))?|from:[\w.\-]+)$")


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently, so a
    second ``stages:`` or ``set:`` would replace the first without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the base class says so
            if first is not None:
                where = f"line {line}" if first == line else f"lines {first} and {line}"
                raise yaml.constructor.ConstructorError(problem=f"key {key!r} appears twice ({where}); give it once")
            seen[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """YAML ``text`` as Python values, by the safe loader, with duplicate keys refused (a ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def yaml_problem(err: yaml.YAMLError) -> str:
    """What is wrong in a YAML text, and where: ``line 5, column 4: expected <block end>, but found '-'`` (PyYAML's
    first line is its context, ``while parsing a block collection``, without either)."""
    problem = getattr(err, "problem", None)
    if not problem:
        return first_line(err)
    mark = getattr(err, "problem_mark", None)
    return problem if mark is None else f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


@dataclass
class SplitConfig:
    """How to split a dataset without its own splits: stratified, grouped by patient, saved in the run."""

    ratios: list[float] = field(default_factory=lambda: [0.7, 0.1, 0.2])
    seed: int = 0
    group_by_patient: bool = True
    use_own: bool = True


@dataclass
class DataConfig:
    """Where the images are and how their labels are read (see ``cxrkit.data.sources``)."""

    format: str = "auto"
    root: str | None = None
    name: str | None = None
    size: int = 28
    task: str = "auto"
    include: list[str] | None = None
    rename: dict[str, str] | None = None
    download: bool = False
    sources: list[dict[str, Any]] = field(default_factory=list)
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class ModelConfig:
    """Backbone, its weights and the new head."""

    backbone: str = "mobilenet_v2"
    weights: str = "imagenet"
    hidden: list[int] = field(default_factory=list)
    dropout: float = 0.0
    image_size: int | None = None
    resize: str = "squash"


@dataclass
class AugmentConfig:
    """Training-time augmentation (``cxrkit.data.transforms.Augment``); no horizontal flip by default."""

    policy: str = "none"
    hflip: bool = False
    rotate: float = 10.0
    translate: float = 0.05
    scale: list[float] = field(default_factory=lambda: [0.9, 1.1])
    brightness: float = 0.1
    contrast: float = 0.1

    @property
    def enabled(self) -> bool:
        """Whether training images change from epoch to epoch: a policy, or flips alone (``policy: none``)."""
        return self.policy != "none" or self.hflip


@dataclass
class EarlyStoppingConfig:
    """Stop a stage when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs (None: never)."""

    monitor: str = "val_loss"
    patience: int | None = None
    min_delta: float = 0.0
    restore_best: bool = True


@dataclass
class StageConfig:
    """One stage of training.

    ``trainable`` says which part learns: ``head`` (feature extraction), ``all`` (full fine-tuning),
    ``top:N`` (the top N layers, counted as Keras counts them; ``top:N:blocks`` counts blocks instead) or
    ``from:<module name>`` (everything from a named cut-off layer on, e.g. ``from:features.denseblock4``).

    ``batchnorm`` says what trainable BatchNorm layers do: ``train`` (batch statistics, PyTorch's usual way),
    ``frozen`` (inference mode with the pretrained statistics while their scale and shift still learn, as Keras
    recommends when fine-tuning a pretrained base) or ``auto`` (``frozen`` for pretrained weights, ``train`` from
    scratch). BatchNorm in the frozen part is always in inference mode.
    """

    name: str = "train"
    trainable: str = "head"
    epochs: int = 10
    optimizer: str = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    schedule: str = "constant"
    batchnorm: str = "auto"
    step_size: int = 5
    gamma: float = 0.1
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class LossConfig:
    """Class imbalance: ``class_weights`` is None, ``balanced`` or one weight per label; or ``sampling: oversample``."""

    class_weights: str | list[float] | None = None
    sampling: str = "none"
    label_smoothing: float = 0.0


@dataclass
class RuntimeConfig:
    """How the run executes; none of this changes what the recipe means."""

    batch_size: int = 32
    eval_batch_size: int = 64
    workers: int | None = None
    precision: str = "auto"
    channels_last: bool | None = None
    device: str = "auto"
    threads: int | None = None
    checkpoint_monitor: str = "val_loss"
    cache_features: bool = True
    cache_engine: str = "auto"
    cache_images: bool = True


@dataclass
class Recipe:
    """Everything a run needs."""

    name: str = "run"
    description: str = ""
    seed: int = 0
    out: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def monitor_notes(self) -> list[str]:
        """One line for each stage that judges its epochs by a metric other than the one that chooses ``best.pt``.

        A stage judges its epochs by ``early_stopping.monitor`` when it stops early (``patience``) or ends with its
        best epoch's weights (``restore_best``, on by default). ``best.pt`` (what ``cxr evaluate``, ``predict`` and
        ``export`` use by default) is the epoch of the whole run with the best ``runtime.checkpoint_monitor``. With
        two metrics, a stage can keep its best epoch by one and still lose ``best.pt`` to an earlier stage, as a
        fine-tuning stage with a higher AUC but a higher loss does."""
        checkpoint = self.runtime.checkpoint_monitor
        return [f"stage {i + 1} ({stage.name}) judges its epochs by {stage.early_stopping.monitor} "
                f"(early_stopping.monitor), but best.pt is chosen by {checkpoint} (runtime.checkpoint_monitor)"
                for i, stage in enumerate(self.stages)
                if (stage.early_stopping.patience is not None or stage.early_stopping.restore_best)
                and stage.early_stopping.monitor != checkpoint]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


_TYPE_NAMES = {int: "whole number", float: "number", str: "string", bool: "true or false", type(None): "null"}


def _type_name(tp: Any) -> str:
    """How an error names a recipe key's type: ``whole number or null``, not ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(tp))
    if tp in _TYPE_NAMES:
        return _TYPE_NAMES[tp]
    if origin in (list, dict):
        return "list" if origin is list else "mapping"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _shown(value: Any) -> str:
    """A value as the recipe (YAML) writes it: true, null, 'text', 1.5."""
    return json.dumps(value) if value is None or isinstance(value, bool) else repr(value)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where it is safe (int -> float)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except CxrError:
                continue
        raise CxrError(f"recipe key {key}: {_shown(value)} is not a {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise CxrError(f"recipe key {key}: expected nothing, got {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise CxrError(f"recipe key {key}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise CxrError(f"recipe key {key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise CxrError(f"recipe key {key}: expected a mapping, got {value!r}")
        key_tp, val_tp = typing.get_args(tp)
        return {_coerce(k, key_tp, key): _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise CxrError(f"recipe key {key}: {_shown(value)} is not a {_type_name(tp)}")


def _from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            where = f"{prefix}." if prefix else ""
            hint = f"; did you mean {where}{close[0]}?" if close else f"; known keys: {', '.join(names)}"
            raise CxrError(f"unknown recipe key {full}{hint}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


MIN_IMAGE_SIZE = 32  # below it the backbones' 32-fold downsampling leaves less than one feature per map
MAX_IMAGE_SIZE = 4096


def _validate(recipe: Recipe) -> None:
    if not recipe.stages:
        raise CxrError("recipe has no stages")
    checks: list[tuple[str, Any, tuple[str, ...]]] = [
        ("runtime.precision", recipe.runtime.precision, ("auto", "bf16", "fp16", "fp32")),
        ("runtime.cache_engine", recipe.runtime.cache_engine, ("auto", "torch", "onnx")),
        ("runtime.checkpoint_monitor", recipe.runtime.checkpoint_monitor, MONITORS),
        ("loss.sampling", recipe.loss.sampling, ("none", "oversample")),
        ("model.resize", recipe.model.resize, ("squash", "crop")),
        ("augment.policy", recipe.augment.policy, ("none", "light", "strong")),
    ]
    aug = recipe.augment
    # (key, value, lowest, whether the lowest is allowed, highest (never allowed), what it must be)
    numbers: list[tuple[str, Any, float, bool, float, str]] = [
        ("loss.label_smoothing", recipe.loss.label_smoothing, 0, True, 1, "in [0, 1)"),
        ("model.dropout", recipe.model.dropout, 0, True, 1, "in [0, 1)"),
        *[(f"augment.{key}", getattr(aug, key), 0, True, math.inf, "at least 0")
          for key in ("rotate", "brightness", "contrast")],
        ("augment.translate", aug.translate, 0, True, math.nextafter(1, 2), "a fraction of the image size, in [0, 1]"),
    ]
    for i, stage in enumerate(recipe.stages):
        checks += [
            (f"stages.{i}.optimizer", stage.optimizer, OPTIMIZERS),
            (f"stages.{i}.schedule", stage.schedule, SCHEDULES),
            (f"stages.{i}.batchnorm", stage.batchnorm, ("auto", "train", "frozen")),
            (f"stages.{i}.early_stopping.monitor", stage.early_stopping.monitor, MONITORS),
        ]
        if not _TRAINABLE.match(stage.trainable):
            raise CxrError(
                f"recipe key stages.{i}.trainable: {stage.trainable!r} is not head, all, top:N, top:N:blocks "
                "or from:<layer name>"
            )
        if stage.epochs < 0:
            raise CxrError(f"recipe key stages.{i}.epochs: {stage.epochs} is negative")
        numbers += [(f"stages.{i}.lr", stage.lr, 0, False, math.inf, "a positive number"),
                    (f"stages.{i}.weight_decay", stage.weight_decay, 0, True, math.inf, "at least 0"),
                    (f"stages.{i}.momentum", stage.momentum, 0, True, 1, "in [0, 1)"),
                    (f"stages.{i}.gamma", stage.gamma, 0, False, math.inf, "a positive number"),
                    (f"stages.{i}.early_stopping.min_delta", stage.early_stopping.min_delta, 0, True, math.inf,
                     "at least 0")]
        if stage.step_size < 1:
            raise CxrError(f"recipe key stages.{i}.step_size: {stage.step_size} must be at least 1 (epochs)")
        patience = stage.early_stopping.patience
        if patience is not None and patience < 0:
            raise CxrError(f"recipe key stages.{i}.early_stopping.patience: {patience} is negative (0 stops at the "
                           "first epoch that does not improve; leave it out never to stop early)")
    for key, value, low, low_allowed, high, must in numbers:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue  # a wrong type is the type check's
        if not (math.isfinite(value) and (value >= low if low_allowed else value > low) and value < high):
            raise CxrError(f"recipe key {key}: {value:g} must be {must}")
    from cxrkit.data.splits import check_ratios

    try:
        check_ratios(recipe.data.split.ratios)
    except (CxrError, TypeError, ValueError) as err:
        raise CxrError(f"recipe key data.split.ratios: {first_line(err)}") from None
    size = recipe.model.image_size
    if size is not None and (not isinstance(size, int) or size < 1):
        raise CxrError(f"recipe key model.image_size: {size!r} is not a positive number of pixels (leave it out for "
                       "the backbone's own size)")
    if size is not None and not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise CxrError(f"recipe key model.image_size: {size} is outside {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE} pixels "
                       "(a CNN shrinks its input 32-fold; leave it out for the backbone's own size)")
    runtime = recipe.runtime
    for key, value, least, meaning in [
        ("batch_size", runtime.batch_size, 1, ""), ("eval_batch_size", runtime.eval_batch_size, 1, ""),
        ("threads", runtime.threads, 1, " (leave it out for PyTorch's own, which follows OMP_NUM_THREADS)"),
        ("workers", runtime.workers, 0, " (0 reads images in the main process; leave it out for the default)"),
    ]:
        if value is not None and value < least:
            raise CxrError(f"recipe key runtime.{key}: {value} must be at least {least}{meaning}")
    if recipe.stages and not any(stage.epochs for stage in recipe.stages):
        raise CxrError("recipe key stages: every stage has 0 epochs, so there is nothing to train")
    for key, value, allowed in checks:
        if value not in allowed:
            raise CxrError(f"recipe key {key}: {value!r} is not one of {', '.join(allowed)}")
    weights = recipe.loss.class_weights
    if isinstance(weights, str) and weights != "balanced":
        raise CxrError(f"recipe key loss.class_weights: {weights!r} is not 'balanced' or a list of numbers")
    if isinstance(weights, list) and (not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights)):
        raise CxrError(f"recipe key loss.class_weights: {weights} must be finite and not negative, and not all 0")
    if any(size < 1 for size in recipe.model.hidden):
        raise CxrError(f"recipe key model.hidden: {recipe.model.hidden} must be sizes of at least 1 (one per dense "
                       "layer; [] for none)")


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.0.c`` in nested dicts / lists, creating mappings (and extending stage lists) as needed."""
    parts = dotted.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit():
                raise CxrError(f"override {dotted}: {part!r} must be a list index")
            index = int(part)
            if index > len(node):
                raise CxrError(f"override {dotted}: index {index} is past the end of a list of {len(node)}")
            if index == len(node):
                node.append({})
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):  # e.g. stages.0.optimizer.lr: optimizer is a name, not a group of keys
            done = ".".join(parts[:i])
            raise CxrError(f"override {dotted}: {done} is a value ({node!r}), not a group of keys; set {done}=...")
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})
            if node is None:
                raise CxrError(f"override {dotted}: {part} is empty")


def not_a_file(path: Path) -> str:
    """Why ``path``, which is not a regular file, cannot be read as one."""
    if path.is_dir():
        return "is a folder, not a YAML file"
    return "is not a regular file (a device or a pipe)" if path.exists() else "does not exist"


def expand_path(path: str, what: str) -> str:
    """``path`` with ``${VARS}`` and ``~`` expanded, as recipes may write their paths (``${CXR_DATA_DIR}/chest_xray``,
    ``~/runs``). ``what`` names the path in the error for an unset variable or an unknown ``~user``."""
    expanded = os.path.expanduser(os.path.expandvars(path))
    # expandvars leaves an unset variable as it is: ${NAME} must be set, while $NAME may be part of a folder's name
    unset = re.search(r"\$\{([^}]*)\}", expanded)
    if unset:
        raise CxrError(f"{what} {path}: set the environment variable {unset.group(1)} it names")
    if expanded.startswith("~"):
        user = expanded[1:].split("/", 1)[0]
        raise CxrError(f"{what} {path}: there is no user {user!r} whose home folder ~{user} could name")
    return expanded


def parse_overrides(pairs: list[str | tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Parse ``key=value`` strings; values are YAML (``1e-5`` -> float, ``[1, 2]`` -> list, ``null`` -> None). A
    ``(key, value)`` pair is taken as it is: a path from a command-line flag is not YAML (``runs #2`` is not
    ``runs``)."""
    parsed = []
    for pair in pairs:
        if isinstance(pair, tuple):
            parsed.append(pair)
            continue
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise CxrError(f"override {pair!r} is not key=value")
        try:
            value = load_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value):
            value = float(value)  # YAML 1.1 reads 1e-5 as a string
        parsed.append((key.strip(), value))
    return parsed


def _fix_floats(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _fix_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_floats(v) for v in node]
    if isinstance(node, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", node):
        return float(node)
    return node


def recipe_from_dict(data: dict[str, Any], overrides: list[str | tuple[str, Any]] | None = None) -> Recipe:
    """Build a checked :class:`Recipe` from a mapping plus overrides (:func:`parse_overrides`)."""
    data = _fix_floats(data or {})
    apply_overrides(data, parse_overrides(overrides or []))
    recipe = _from_dict(Recipe, data)
    _validate(recipe)
    return recipe


def apply_overrides(data: dict[str, Any], pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Set dotted ``pairs`` in the recipe mapping ``data`` in order (in place; ``stages.N`` of a recipe without
    stages starts from one default stage) and return it.

    A stage that dotted keys add must say what trains and for how long: ``stages.2.lr=1e-5`` on a two-stage recipe
    (whose log counts stages from 1) would otherwise add a default 10-epoch head stage silently."""
    added: dict[int, tuple[int, list[str]]] = {}  # a new stage's index -> (stages before it, its keys)
    for key, value in pairs:
        parts = key.split(".")
        if parts[0] == "stages" and len(parts) > 1:
            if data.get("stages") is None:  # an emptied list (stages=[]) stays empty: its stages are added ones
                data["stages"] = [dataclasses.asdict(StageConfig())]
            if isinstance(data["stages"], list) and parts[1].isdigit() and len(parts) > 2:
                index = int(parts[1])
                if index in added:
                    added[index][1].append(key)
                elif index >= len(data["stages"]):
                    added[index] = (len(data["stages"]), [key])
        elif key == "stages":
            added.clear()  # every stage given in full
        _set_dotted(data, key, value)
    for index, (before, keys) in added.items():
        missing = [name for name in ("trainable", "epochs") if f"stages.{index}.{name}" not in keys]
        if missing:
            which = f", stages.0 to stages.{before - 1} (the training log counts them from 1)" if before else ""
            raise CxrError(f"override {keys[0]}: the recipe has {before} stage(s){which}; to add stages.{index}, also "
                           "set " + " and ".join(f"stages.{index}.{name}" for name in missing))
    return data


def load_recipe(path: str | Path | None, overrides: list[str | tuple[str, Any]] | None = None) -> Recipe:
    """Load a YAML recipe (or the defaults when ``path`` is None) and apply overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise CxrError(f"recipe {path} {not_a_file(path)}")
        try:
            data = load_yaml(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as err:
            raise CxrError(f"recipe {path} is not UTF-8 text (byte {err.start}); save it as UTF-8 YAML") from None
        except yaml.YAMLError as err:
            raise CxrError(f"recipe {path} is not valid YAML: {yaml_problem(err)}") from None
        if not isinstance(data, dict):
            raise CxrError(f"recipe {path} must be a mapping of keys to values")
        data.setdefault("name", path.stem)
    try:
        return recipe_from_dict(data, overrides)
    except CxrError as err:  # name the file: a run's recipe.yaml edited by hand is read without the user naming it
        if path is None or overrides:  # the mistake may be in an override, not in the file
            raise
        raise CxrError(f"{path}: {err}") from None
