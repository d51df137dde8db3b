"""``cxr explain``: heatmaps for image files, and study 3's confusion-matrix grid of heatmaps for a split.

Per image and explained class the output folder gets ``<name>.<class>.png`` (overlay), ``<name>.<class>.npy``
(the raw map over the model input, float32 in [0, 1]) and one ``<name>.json`` with the probabilities, the box of
the original image the map covers, the faithfulness check and the settings that made them; ``explain.csv`` sums
up every image in the folder. Every file is written atomically, and an image whose ``.json`` records the same
source file and settings is not redone, so an interrupted run over thousands of images resumes where it stopped.
An image explained before with other settings (target, layer, checkpoint, check) is explained again and its old
files go; another file with the same name gets a name of its own (``<name>-2``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrkit.errors import CxrError
from cxrkit.explain.faithfulness import SEEDING, VERDICTS
from cxrkit.explain.gradcam import Explainer, choose_targets, method_info
from cxrkit.explain.plots import Explained, plot_overlay
from cxrkit.runs import (
    TEMPORARY,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    csv_text,
    remove_dead_writes,
    safe_name,
    unique_safe_names,
)
from cxrkit.serve.predictor import Predictor

SUMMARY_COLUMNS = ["source", "target", "probability", "predicted", "drop_heatmap", "drop_random", "score",
                   "verdict", "png", "npy"]


@dataclass
class ExplainOptions:
    """What to explain and how.

    Attributes:
        method: a CAM method of :data:`~cxrkit.explain.gradcam.METHODS`.
        layer: target layer; None for the backbone spec's CAM layer.
        targets: class names to explain, ``["all"]``, or empty for the predicted class (per label for multilabel).
        check: run the faithfulness check.
        percent: share of pixels the check removes.
        n_random: random regions the check compares with.
        opacity: heatmap opacity in the overlays.
        batch_size: images per forward/backward pass.
        seed: seeds the check (and random picks in the grid).
    """

    method: str = "gradcam"
    layer: str | None = None
    targets: Sequence[str] = ()
    check: bool = True
    percent: float = 20.0
    n_random: int = 3
    opacity: float = 0.45
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):  # one class name, not its letters
            self.targets = (self.targets,)
        method_info(self.method)
        if why := option_problem(vars(self)):
            raise CxrError(why)


OPTION_RULES: tuple[tuple[str, Callable[[float], bool], str], ...] = (
    ("percent", lambda v: 0 < v < 100, "must be above 0 and below 100 (percent)"),
    ("opacity", lambda v: 0 <= v <= 1, "must be from 0 to 1"),
    ("batch_size", lambda v: v >= 1, "must be at least 1"),
    ("n_random", lambda v: v >= 1, "must be at least 1"),
)


def option_problem(values: Mapping[str, Any], names: Mapping[str, str] | None = None) -> str | None:
    """What is wrong with the numeric options in ``values`` (by :class:`ExplainOptions` field), or None; ``names``
    spells the fields as the caller does (``{"percent": "--remove"}`` on the command line)."""
    for key, ok, rule in OPTION_RULES:
        if not ok(values[key]):
            return f"{(names or {}).get(key, key)} {values[key]:g} {rule}"
    return None


@dataclass
class MapResult:
    """One explained class of one image."""

    index: int
    heatmap: np.ndarray
    probability: float
    check: dict[str, float] | None = None


@dataclass
class FilesResult:
    """What :func:`explain_files` did: summary rows (one per image and class), and unreadable files."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: int = 0
    redone: int = 0


def explain_batch(explainer: Explainer, predictor: Predictor, images: Sequence[Any], options: ExplainOptions,
                  classes: Sequence[Sequence[int]] | None = None) -> tuple[np.ndarray, list[list[MapResult]]]:
    """Heatmaps (and the faithfulness check) for decoded images.

    Args:
        explainer: an open :class:`Explainer` on ``predictor.model``.
        predictor: the run.
        images: decoded PIL images.
        options: what to explain.
        classes: class indices per image; None to choose them with :func:`choose_targets`.

    Returns:
        The calibrated probabilities ``[B, outputs]`` and, per image, one :class:`MapResult` per explained class.
    """
    import torch

    from cxrkit.explain.faithfulness import faithfulness

    x = predictor.runtime.to_device(torch.stack([predictor.transform(im) for im in images]))
    probs = explainer.probabilities(x)
    if classes is None:
        classes = choose_targets(predictor.task, predictor.labels, probs, predictor.threshold, options.targets)
    pairs = [(i, c) for i, cs in enumerate(classes) for c in cs]
    results: list[list[MapResult]] = [[] for _ in images]
    for start in range(0, len(pairs), options.batch_size):
        chunk = pairs[start : start + options.batch_size]
        xs = x[[i for i, _ in chunk]]
        maps = explainer.heatmaps(xs, [c for _, c in chunk])
        checks = [None] * len(chunk)
        if options.check:
            checks = [f.to_dict() for f in faithfulness(
                predictor.model, xs, maps, [c for _, c in chunk], predictor.task, predictor.temperature,
                options.percent, options.n_random, explainer.grid_shape or (7, 7), options.seed)]
        for (i, c), heat, check in zip(chunk, maps, checks):
            results[i].append(MapResult(c, heat, float(probs[i, c]), check))
    return probs, results


def check_text(check: dict[str, float] | None) -> str | None:
    """One line for a figure: how much the probability drops without the top region vs a random one."""
    if not check:
        return None
    return (f"removing the top {check['percent_removed']:g}% drops p by {check['drop_heatmap']:.3f}, "
            f"a random region by {check['drop_random']:.3f}: {check['verdict']}")


def verdict_summary(checks: Sequence[dict[str, Any]]) -> str:
    """``"12 meaningful, 3 inconclusive, 1 no better than random (mean extra drop in p +0.081)"``."""
    counts: dict[str, int] = {}
    for c in checks:
        counts[c["verdict"]] = counts.get(c["verdict"], 0) + 1
    order = ("meaningful", "inconclusive", "no better than random")
    mean = float(np.mean([float(c["score"]) for c in checks])) if checks else 0.0
    parts = ", ".join(f"{counts[v]} {v}" for v in order if v in counts)
    return f"{parts} (mean extra drop in p {mean:+.3f})"


def settings_of(predictor: Predictor, options: ExplainOptions) -> dict[str, Any]:
    """What an image's maps and check depend on besides the image: kept in its ``.json`` to decide resuming."""
    return {"checkpoint": predictor.checkpoint, "weights_sha256": predictor.weights_sha256, "method": options.method,
            "layer": options.layer, "targets": list(options.targets), "check": options.check,
            "percent": options.percent, "n_random": options.n_random, "seed": options.seed,
            "opacity": options.opacity, "temperature": predictor.temperature, "threshold": predictor.threshold,
            "verdicts": VERDICTS, "check_seeding": SEEDING}


def _record(out_dir: Path, name: str) -> dict[str, Any] | None:
    """The ``<name>.json`` of an explained image, or None (absent, unreadable, or another kind of file)."""
    try:
        record = json.loads((out_dir / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "rows" in record and "source" in record else None


def _names(paths: Sequence[str], out_dir: Path) -> list[str]:
    """Output names from file stems (only ``[A-Za-z0-9._-]``), unique in input order; a name whose record in
    ``out_dir`` belongs to another file is passed over (``<stem>-2``, ``-3``...), so runs into one folder never
    mistake one image for another."""
    used: set[str] = set()
    names = []
    for path in paths:
        stem = safe_name(Path(path).stem, "image")
        for k in itertools.count(1):
            name = stem if k == 1 else f"{stem}-{k}"
            record = _record(out_dir, name) if name not in used else None
            if name not in used and (record is None or _same_file(record["source"], path)):
                break
        used.add(name)
        names.append(name)
    return names


def _same_file(a: Any, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, TypeError):  # one of them is gone: compare the names
        return str(a) == str(b)


def _decoded(paths: Sequence[str], names: Sequence[str], out_dir: Path, overwrite: bool, settings: dict[str, Any],
             result: FilesResult, batch_size: int) -> Iterator[list[tuple[str, str, Any, dict[str, Any] | None]]]:
    """Batches of ``(path, name, image, earlier record or None)``; unreadable files go to ``result.failed``, and
    images done with these settings are reloaded."""
    from cxrkit.data.images import read_image, refuse_blank

    batch: list[tuple[str, str, Any, dict[str, Any] | None]] = []
    for path, name in zip(paths, names):
        record = _record(out_dir, name)
        if record is not None and not overwrite and record.get("settings") == settings:
            result.rows += record["rows"]
            result.skipped += 1
            continue
        try:
            image = refuse_blank(read_image(path), path)  # as cxr predict and the service do: nothing to explain
        except CxrError as err:
            result.failed.append((path, str(err)))
            continue
        if record is not None:
            result.redone += record.get("settings") != settings
        batch.append((path, name, image, record))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _remove_stale(out_dir: Path, earlier: dict[str, Any] | None, rows: list[dict[str, Any]]) -> None:
    """Remove the maps of an image's earlier record that its new record (already written) no longer lists."""
    kept = {row[kind] for row in rows for kind in ("png", "npy")}
    for row in earlier["rows"] if earlier is not None else []:
        for kind in ("png", "npy"):
            name = row.get(kind)
            if isinstance(name, str) and name == Path(name).name and name not in kept:
                (out_dir / name).unlink(missing_ok=True)


def folder_rows(out_dir: Path) -> list[dict[str, Any]]:
    """The summary rows of every image explained in ``out_dir``, by output name."""
    rows = []
    for path in sorted(out_dir.glob("*.json")):
        record = _record(out_dir, path.stem)
        if record is not None:
            rows += record["rows"]
    return rows


def explain_files(predictor: Predictor, paths: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | Path,
                  options: ExplainOptions | None = None, overwrite: bool = False, progress: Any = None) -> FilesResult:
    """Overlays, raw maps and the faithfulness check for image files (PNG, JPEG, DICOM, ...): one path or several
    (folders and patterns through :func:`~cxrkit.serve.predictor.expand_inputs` first).

    Unreadable files are listed in the result and the others still explained. ``progress`` is a rich Progress.
    """
    paths = [os.fspath(p) for p in ([paths] if isinstance(paths, str | os.PathLike) else paths)]
    options = options or ExplainOptions()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = out_dir / "explain.csv"
    remove_dead_writes(summary, TEMPORARY)  # the temporary files that a killed run left
    result = FilesResult()
    try:
        _explain_into(predictor, paths, out_dir, options, overwrite, progress, result)
    except BaseException:  # Ctrl-C, a full disk: the summary still lists the images explained so far
        with contextlib.suppress(Exception):
            atomic_write_text(summary, csv_text(folder_rows(out_dir), SUMMARY_COLUMNS))
        raise
    atomic_write_text(summary, csv_text(folder_rows(out_dir), SUMMARY_COLUMNS))
    return result


def _explain_into(predictor: Predictor, paths: list[str], out_dir: Path, options: ExplainOptions, overwrite: bool,
                  progress: Any, result: FilesResult) -> None:
    """Explain ``paths`` into ``out_dir`` (each image's maps, figures and ``.json``), adding to ``result``."""
    from cxrkit.data.transforms import input_box

    bar = progress.add_task("explain", total=len(paths), rate="") if progress is not None else None
    names = _names(paths, out_dir)
    settings = settings_of(predictor, options)
    processed = 0
    with Explainer(predictor.model, predictor.task, options.method, options.layer, predictor.temperature) as ex:
        for batch in _decoded(paths, names, out_dir, overwrite, settings, result, options.batch_size):
            probs, maps = explain_batch(ex, predictor, [im for _, _, im, _ in batch], options)
            decided = predictor.decide(probs)
            for (path, name, image, earlier), p, predicted, image_maps in zip(batch, probs, decided, maps):
                box = input_box(predictor.preprocessing, *image.size)
                rows = [_write_map(out_dir, name, path, image, box, m, predicted, predictor, ex, options)
                        for m in image_maps]
                atomic_write_json(out_dir / f"{name}.json", {
                    "source": str(path), "predicted": predicted, "box": [round(v, 2) for v in box],
                    "probabilities": {n: round(float(q), 6) for n, q in zip(predictor.labels, p)},
                    "method": ex.method_name, "layer": ex.layer_name, "settings": settings, "rows": rows})
                _remove_stale(out_dir, earlier, rows)
                result.rows += rows
            processed += len(batch)
            if bar is not None:
                progress.update(bar, completed=processed + result.skipped + len(result.failed))
    if bar is not None:
        progress.update(bar, completed=len(paths))


def _write_map(out_dir: Path, name: str, path: str, image: Any, box: tuple[float, float, float, float],
               m: MapResult, predicted: str, predictor: Predictor, ex: Explainer,
               options: ExplainOptions) -> dict[str, Any]:
    label = predictor.labels[m.index]
    stem = f"{name}.{unique_safe_names(predictor.labels)[m.index]}"  # labels 病毒 and 肺炎: x and x-2
    atomic_write(out_dir / f"{stem}.npy", lambda fh: np.save(fh, m.heatmap.astype(np.float32)))
    item = Explained(image, m.heatmap, box, label, m.probability, predicted, Path(path).name, check_text(m.check))
    plot_overlay(item, ex.method_name, ex.layer_name, out_dir / f"{stem}.png", options.opacity)
    check = m.check or {}
    return {"source": str(path), "target": label, "probability": round(m.probability, 6), "predicted": predicted,
            "drop_heatmap": check.get("drop_heatmap", ""), "drop_random": check.get("drop_random", ""),
            "score": check.get("score", ""), "verdict": check.get("verdict", ""), "png": f"{stem}.png",
            "npy": f"{stem}.npy"}


__all__ = ["ExplainOptions", "FilesResult", "MapResult", "check_text", "explain_batch", "explain_files",
           "verdict_summary"]
