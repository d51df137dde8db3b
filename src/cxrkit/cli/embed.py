"""``cxr embed``: t-SNE or UMAP maps of a layer's features, coloured by class with the mistakes marked."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def _perplexity(text: str) -> float | None:
    from cxrkit.errors import CxrError

    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise CxrError(f"--perplexity {text!r} is not a number or auto") from None


def embed(
    run: Path = typer.Argument(..., help="Run directory"),
    split: str = typer.Option("test", "--split", help="train, val or test"),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset (default: the run's own)"),
    layer: list[str] = typer.Option([], "--layer", help="Layer to map, e.g. features.14 (repeatable; default: the "
                                    "head's input)"),
    method: str = typer.Option("tsne", "--method", help="tsne or umap"),
    max_points: int = typer.Option(2000, "--max-points", help="Sample larger splits to this many images"),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample and the projection"),
    pool: str = typer.Option("avg", "--pool", help="avg (global average of feature maps) or flatten"),
    perplexity: str = typer.Option("auto", "--perplexity", help="t-SNE perplexity; auto = min(30, (n-1)/3)"),
    label: Optional[str] = typer.Option(None, "--label", help="Multi-label runs: the label to map"),
    map_: list[str] = typer.Option([], "--map", help="Map a dataset label to a model label: --map COVID=PNEUMONIA"),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best or last"),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for the files (default: RUN/embed)"),
) -> None:
    """Map features of a split to 2-D; writes a PNG, a CSV of coordinates and a JSON summary per layer."""
    from rich.table import Table

    from cxrkit.cli.evaluate import parse_label_map
    from cxrkit.console import notes_console
    from cxrkit.explain.embed import embed_run
    from cxrkit.serve.predictor import Predictor

    console = notes_console()
    label_map = parse_label_map(map_) or None
    predictor = Predictor(run, checkpoint=checkpoint)
    maps = embed_run(predictor, data, split, layer, method, max_points, seed, pool, _perplexity(perplexity), label,
                     label_map, batch_size, out, console)
    for m in maps:
        s = m.summary
        score = "n/a" if s["knn_balanced_accuracy"] is None else f"{s['knn_balanced_accuracy']:.3f}"
        console.print(f"{s['layer']} ({s['feature_dim']}-d): 5-NN balanced accuracy {score}, "
                      f"{s['misclassified']} of {s['n_sampled']} misclassified"
                      + (f", sampled from {s['n_total']} (seed {s['seed']})" if s["sampled"] else ""))
    if len(maps) > 1:
        first = maps[0].summary
        table = Table(title=f"{first['dataset']} {first['split']}: {first['n_sampled']} images, "
                            f"5-NN balanced accuracy by layer (chance {first['knn']['chance']:.2f})")
        for column in ("layer", "output shape", "features", "5-NN bal. acc."):
            table.add_column(column, justify="left" if column == "layer" else "right")
        for m in maps:
            s = m.summary
            score = "n/a" if s["knn_balanced_accuracy"] is None else f"{s['knn_balanced_accuracy']:.3f}"
            table.add_row(s["layer"], "x".join(map(str, s["layer_shape"])), str(s["feature_dim"]), score)
        console.print(table)
    for m in maps:
        for path in m.files.values():
            print(path)
