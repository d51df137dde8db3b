"""Feature maps of a run: a layer's features for a split, projected to 2-D with t-SNE or UMAP.

The default features are the head's input (the pooled backbone output); any named layer works too, so cut-off
layers can be compared. Large splits are sampled, stratified by true class and seeded, *before* the model runs.
Predictions come from the same forward pass, with the run's calibrated probabilities and decision rule, so
"misclassified" means what it means in ``cxr evaluate``. A patient-grouped 5-nearest-neighbour balanced accuracy on
the features (not on the 2-D map) makes comparing layers honest: t-SNE pictures can look separated when they are not.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cxrkit.errors import CxrError

if TYPE_CHECKING:
    import torch

    from cxrkit.data.base import LabelledImages
    from cxrkit.serve.predictor import Predictor

METHODS: dict[str, str] = {"tsne": "t-SNE", "umap": "UMAP"}
POOLS: tuple[str, ...] = ("avg", "flatten")
MIN_POINTS = 5
DEFAULT_LAYER = "features"  # the head's input: the pooled backbone output


@dataclass(frozen=True)
class Layer:
    """A layer to read features from: ``name`` for people and files, ``path`` in the model, and the module."""

    name: str
    path: str
    module: Any


@dataclass(frozen=True)
class ClassView:
    """The classes points are coloured by: ``true`` holds a class index per image (-1: unknown, left out)."""

    names: list[str]
    true: np.ndarray
    label: str | None = None  # the label a multilabel map is about


@dataclass
class LayerMap:
    """One layer's map: its summary (the JSON) and the files written."""

    summary: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def resolve_layers(model: Any, names: Sequence[str | None]) -> list[Layer]:
    """The layers to read, in order, without repeats; None (or an empty list) means the head's input."""
    from cxrkit.explain.layers import resolve_layer

    layers: list[Layer] = []
    for name in list(names) or [None]:
        if name is None:
            layer = Layer(DEFAULT_LAYER, "backbone", model.backbone)
        else:
            path, module = resolve_layer(model, name)
            short = path.removeprefix("backbone.")
            layer = Layer(path if short == DEFAULT_LAYER else short, path, module)
        if all(layer.path != seen.path for seen in layers):
            layers.append(layer)
    return layers


def class_view(task: str, labels: Sequence[str], targets: np.ndarray, label: str | None = None) -> ClassView:
    """True classes per image: the class (binary, multiclass) or absent / present of one label (multilabel).

    Args:
        task: the run's task.
        labels: the run's label names.
        targets: class indices ``[n]`` or multilabel rows ``[n, labels]`` with nan for unknown.
        label: for multilabel, the label to map (default: the most prevalent one).

    Raises:
        CxrError: ``label`` is unknown, or given for a single-label run.
    """
    from cxrkit.data.labels import find_label

    if task != "multilabel":
        if label is not None:
            raise CxrError(f"--label is for multi-label runs; this run is {task} ({', '.join(labels)})")
        return ClassView(list(labels), np.asarray(targets, dtype=np.int64))
    if label is None:
        column = int(np.argmax(np.nansum(targets, axis=0)))
    else:
        found = find_label(label, labels)
        if found is None:
            raise CxrError(f"unknown label {label!r}; the run's labels are {', '.join(labels)}")
        column = found
    values = targets[:, column]
    true = np.where(np.isnan(values), -1, values > 0.5).astype(np.int64)
    name = labels[column]
    return ClassView([f"no {name}", name], true, name)


def stratified_sample(classes: np.ndarray, max_points: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``max_points`` rows, each class keeping its share (largest remainders round up).

    Returns every index when there are no more than ``max_points`` rows; the same seed gives the same rows.
    """
    classes = np.asarray(classes)
    n = len(classes)
    if n <= max_points:
        return np.arange(n)
    values, counts = np.unique(classes, return_counts=True)
    quota = counts * max_points / n
    take = np.floor(quota).astype(int)
    extra = np.argsort(-(quota - take), kind="stable")[: max_points - int(take.sum())]
    take[extra] += 1
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(classes == v), k, replace=False) for v, k in zip(values, take)]
    return np.sort(np.concatenate(picked))


def pool_features(output: torch.Tensor, pool: str) -> torch.Tensor:
    """``[B, ...]`` layer output to ``[B, D]`` float32: ``avg`` averages over space (4-D) or tokens (3-D)."""
    if output.dim() > 2 and pool == "avg":
        output = output.float().mean(dim=tuple(range(2, output.dim())) if output.dim() == 4 else 1)
    return output.float().reshape(output.shape[0], -1)


def extract_features(predictor: Predictor, ds: LabelledImages, layers: Sequence[Layer], pool: str = "avg",
                     batch_size: int = 64, console: Any = None) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """One forward pass over ``ds``: each layer's pooled features and the model's (uncalibrated) probabilities.

    Returns:
        ``(features by layer path [n, D] float32, probabilities [n, labels], layer output shapes by path)``.
    """
    import torch

    from cxrkit.explain.layers import capture_output
    from cxrkit.pipeline import make_loader
    from cxrkit.train.loop import make_progress
    from cxrkit.train.losses import probabilities

    runtime, model = predictor.runtime, predictor.model
    loader = make_loader(ds, predictor.transform, batch_size, runtime)
    features: dict[str, list[np.ndarray]] = {layer.path: [] for layer in layers}
    shapes: dict[str, list[int]] = {}
    probs: list[np.ndarray] = []
    with ExitStack() as stack, torch.no_grad():
        captured = [stack.enter_context(capture_output(layer.module)) for layer in layers]
        progress = stack.enter_context(make_progress(console, enabled=console is not None))
        bar = progress.add_task("features", total=len(loader), rate="")
        for batch in loader:
            x = runtime.to_device(batch["image"])
            with runtime.autocast():
                logits = model(x).float()
            probs.append(probabilities(predictor.task, logits).cpu().numpy())
            for layer, outputs in zip(layers, captured):
                if len(outputs) != 1:
                    raise CxrError(f"layer {layer.path} runs {len(outputs)} times per image; name another layer")
                shapes[layer.path] = list(outputs[0].shape[1:])
                features[layer.path].append(pool_features(outputs.pop(), pool).cpu().numpy())
            progress.update(bar, advance=1)
    stacked = {path: np.concatenate(chunks).astype(np.float32, copy=False) for path, chunks in features.items()}
    return stacked, np.concatenate(probs), shapes


def standardize(features: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per column (constant columns become zero)."""
    x = np.asarray(features, dtype=np.float64)
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


def project(features: np.ndarray, method: str = "tsne", seed: int = 0,
            perplexity: float | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """2-D coordinates of standardized features, and the projection's parameters.

    t-SNE (van der Maaten & Hinton, 2008) runs on the first 50 principal components of wider features, with
    perplexity ``min(30, (n - 1) / 3)`` unless given and PCA initialisation; UMAP (McInnes et al., 2018) uses
    ``n_neighbors = min(15, n - 1)``. Both are seeded.

    Raises:
        CxrError: fewer than 5 points, an unknown method or a perplexity outside ``(0, n)``.
    """
    n = len(features)
    if method not in METHODS:
        raise CxrError(f"unknown method {method!r}; use {' or '.join(METHODS)}")
    if n < MIN_POINTS:
        raise CxrError(f"{n} images are too few for a {METHODS[method]} map; it needs at least {MIN_POINTS}")
    x = standardize(features)
    if not x.any():
        raise CxrError(f"all {n} images have the same features; there is nothing to map")
    if method == "umap":
        import umap

        params: dict[str, Any] = {"n_neighbors": min(15, n - 1), "min_dist": 0.1, "metric": "euclidean"}
        reducer = umap.UMAP(n_components=2, random_state=seed, n_jobs=1, **params)
        return np.asarray(reducer.fit_transform(x), dtype=np.float64), params
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    params = {"pca_components": None, "perplexity": perplexity, "init": "pca", "learning_rate": "auto"}
    if x.shape[1] > 50:
        params["pca_components"] = min(50, n)
        x = PCA(n_components=params["pca_components"], random_state=seed).fit_transform(x)
    if perplexity is None:
        params["perplexity"] = min(30.0, (n - 1) / 3)
    elif not 0 < perplexity < n:
        raise CxrError(f"perplexity {perplexity} must be between 0 and the number of points ({n})")
    tsne = TSNE(n_components=2, perplexity=params["perplexity"], init="pca", learning_rate="auto", random_state=seed)
    return np.asarray(tsne.fit_transform(x), dtype=np.float64), params


def knn_balanced_accuracy(features: np.ndarray, classes: np.ndarray, groups: Sequence[Any], k: int = 5,
                          max_folds: int = 5) -> float | None:
    """Balanced accuracy of a k-nearest-neighbour classifier on standardized features, cross-validated by group.

    Folds never split a patient (``GroupKFold`` with ``min(max_folds, patients)`` folds); the scaler is fitted on
    each training fold. Chance is ``1 / classes``.

    Returns:
        The score over all out-of-fold predictions, or None with fewer than 2 patients or 1 class.
    """
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GroupKFold
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y, groups = np.asarray(features, dtype=np.float64), np.asarray(classes), np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_groups < 2 or len(np.unique(y)) < 2:
        return None
    predicted = np.empty_like(y)
    for train, test in GroupKFold(n_splits=min(max_folds, n_groups)).split(x, y, groups):
        model = make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=min(k, len(train))))
        predicted[test] = model.fit(x[train], y[train]).predict(x[test])
    return float(balanced_accuracy_score(y, predicted))


def _predicted_classes(view: ClassView, decided: Sequence[str]) -> np.ndarray:
    """The decided class per image, in the view's classes (multilabel: whether the view's label was decided)."""
    if view.label is not None:
        return np.asarray([int(view.label in d.split("|")) for d in decided], dtype=np.int64)
    return np.asarray([view.names.index(d) for d in decided], dtype=np.int64)


def _file_stem(*parts: str) -> str:
    from cxrkit.runs import safe_name

    return "-".join(safe_name(p) for p in parts if p)


def embed_run(
    predictor: Predictor, data: str | None = None, split: str = "test", layers: Sequence[str | None] = (),
    method: str = "tsne", max_points: int = 2000, seed: int = 0, pool: str = "avg", perplexity: float | None = None,
    label: str | None = None, label_map: dict[str, str] | None = None, batch_size: int = 64,
    out: str | Path | None = None, console: Any = None,
) -> list[LayerMap]:
    """Map the features of ``layers`` for a split (or another dataset); write a PNG, CSV and JSON per layer.

    Args:
        predictor: the loaded run.
        data: another dataset (external validation, labels mapped by name); None for the run's own.
        split: ``train``, ``val`` or ``test``.
        layers: module names (see :func:`~cxrkit.explain.layers.resolve_layer`); empty for the head's input.
        method: ``tsne`` or ``umap``.
        max_points: larger splits are sampled to this many images, stratified by true class.
        seed: seeds the sample and the projection.
        pool: ``avg`` (global average of spatial maps) or ``flatten`` (every value).
        perplexity: t-SNE perplexity; None for ``min(30, (n - 1) / 3)``.
        label: for multilabel runs, the label to map (default: the most prevalent).
        label_map: dataset label -> model label, as in ``cxr evaluate --map``.
        batch_size: images per forward pass.
        out: the folder for the files (default ``RUN/embed``).
        console: a rich console for the progress bar; None for none.

    Returns:
        One :class:`LayerMap` per layer, in order.
    """
    from cxrkit.eval.evaluate import mapped_targets, select_data

    if method not in METHODS:
        raise CxrError(f"unknown method {method!r}; use {' or '.join(METHODS)}")
    if pool not in POOLS:
        raise CxrError(f"unknown pooling {pool!r}; use {' or '.join(POOLS)}")
    if max_points < MIN_POINTS:
        raise CxrError(f"--max-points {max_points} is too few; a map needs at least {MIN_POINTS} images")
    chosen = resolve_layers(predictor.model, layers)
    ds, ds_name, external, split = select_data(predictor, data, split)
    view = class_view(predictor.task, predictor.labels, mapped_targets(ds, predictor.labels, label_map), label)
    known = np.flatnonzero(view.true >= 0)
    if len(known) < MIN_POINTS:
        what = f"a known {view.label}" if view.label else "images"
        raise CxrError(f"the {split} split of {ds_name} has {len(known)} {what}; a map needs at least {MIN_POINTS}")
    rows = known[stratified_sample(view.true[known], max_points, seed)]
    images = ds.subset(rows)
    features, probs, shapes = extract_features(predictor, images, chosen, pool, batch_size, console)
    probs = predictor.calibrate(probs)
    true, predicted = view.true[rows], _predicted_classes(view, predictor.decide(probs))
    context = {
        "run": predictor.run.name, "checkpoint": predictor.checkpoint, "dataset": ds_name, "split": split,
        "external": external, "task": predictor.task, "label": view.label, "classes": view.names,
        "method": method, "seed": seed, "n_total": int(len(known)), "n_sampled": int(len(rows)),
        "sampled": bool(len(rows) < len(known)),
    }
    out_dir = Path(out) if out is not None else predictor.run.path / "embed"
    maps = []
    for layer in chosen:
        pooled = pool if len(shapes[layer.path]) > 1 else "none"
        # a flattened map is another feature set than the pooled one: its files must not replace the pooled map's
        stem = _file_stem(ds_name, split, layer.name.replace(".", "_"), "flatten" if pooled == "flatten" else "",
                          method, view.label or "")
        summary = {**context, "layer": layer.name, "module": layer.path, "layer_shape": shapes[layer.path],
                   "pool": pooled}
        maps.append(_map_layer(features[layer.path], true, predicted, probs, images, predictor.labels, summary,
                               perplexity, out_dir / stem))
    return maps


def _map_layer(features: np.ndarray, true: np.ndarray, predicted: np.ndarray, probs: np.ndarray,
               images: LabelledImages, labels: Sequence[str], summary: dict[str, Any], perplexity: float | None,
               stem: Path) -> LayerMap:
    """Score, project, draw and write one layer's map."""
    from cxrkit.eval.plots import save_figure
    from cxrkit.explain.embed_figure import embedding_figure, embedding_titles
    from cxrkit.runs import atomic_write_json, atomic_write_text, csv_text

    patients = [it.patient for it in images.items]
    score = knn_balanced_accuracy(features, true, patients)
    try:
        xy, params = project(features, summary["method"], summary["seed"], perplexity)
    except CxrError as err:
        raise CxrError(f"layer {summary['layer']}: {err}") from None
    correct = true == predicted
    names = summary["classes"]
    summary = {
        **summary, "feature_dim": int(features.shape[1]), "knn_balanced_accuracy": score,
        "knn": {"k": 5, "cv": "GroupKFold by patient", "folds": min(5, len(set(patients))),
                "chance": 1 / len(names)},
        "projection": params, "patients": len(set(patients)), "misclassified": int((~correct).sum()),
    }
    rows = []
    for item, t, p, ok, (x, y), prob in zip(images.items, true, predicted, correct, xy, probs):
        row = {"source": item.source, "patient": item.patient, "true": names[t], "predicted": names[p],
               "correct": int(ok), "x": round(float(x), 5), "y": round(float(y), 5)}
        row.update({f"p_{n}": round(float(q), 6) for n, q in zip(labels, prob)})
        rows.append(row)
    files = {kind: stem.with_name(f"{stem.name}.{kind}") for kind in ("png", "csv", "json")}
    summary["files"] = {kind: path.name for kind, path in files.items()}
    title, subtitle = embedding_titles(summary)
    figure = embedding_figure(xy, true, correct, names, title, subtitle, METHODS[summary["method"]])
    save_figure(figure, files["png"])
    atomic_write_text(files["csv"], csv_text(rows))
    atomic_write_json(files["json"], summary)
    return LayerMap(summary, files)


__all__ = [
    "DEFAULT_LAYER", "METHODS", "POOLS", "ClassView", "Layer", "LayerMap", "class_view", "embed_run",
    "extract_features", "knn_balanced_accuracy", "pool_features", "project", "resolve_layers", "standardize",
    "stratified_sample",
]
