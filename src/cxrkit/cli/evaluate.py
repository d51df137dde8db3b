"""``cxr evaluate``: metrics of a run on a split of its data or on another dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def parse_label_map(pairs: list[str]) -> dict[str, str]:
    from cxrkit.errors import CxrError

    mapping = {}
    for pair in pairs:
        src, sep, dst = pair.partition("=")
        if not sep or not src or not dst:
            raise CxrError(f"--map {pair!r} is not DATASET_LABEL=MODEL_LABEL")
        mapping[src] = dst
    return mapping


def evaluate(
    run: Path = typer.Argument(..., help="Run directory"),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset (default: the run's own)"),
    split: Optional[str] = typer.Option(
        None, "--split", help="train, val or test (default test); an external dataset without splits is evaluated "
                              "whole"),
    name: Optional[str] = typer.Option(None, "--name", help="Folder name under RUN/eval/"),
    map_: list[str] = typer.Option([], "--map", help="Map a dataset label to a model label: --map COVID=PNEUMONIA"),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best or last"),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    engine: str = typer.Option(
        "torch", "--engine", help="torch, onnx (ONNX Runtime; exported on first use), onnx-int8 (ONNX Runtime in int8; "
                                  "quantized on first use with ranges from training images) or auto"),
) -> None:
    """Evaluate a run; writes RUN/eval/<name>/metrics.json and predictions.csv."""
    from rich.table import Table

    from cxrkit.console import notes_console
    from cxrkit.eval.evaluate import evaluate_run
    from cxrkit.eval.metrics import format_metrics_table
    from cxrkit.serve.predictor import Predictor

    console = notes_console()
    predictor = Predictor(run, checkpoint=checkpoint, engine=engine)
    metrics, out = evaluate_run(predictor, data, split or "test", name, parse_label_map(map_) or None, batch_size,
                                console)
    if split is not None and metrics["split"] == "all":
        console.print(f"note: {data} has no splits of its own, so --split {split} does not apply: all "
                      f"{metrics['n']} images were evaluated", highlight=False)
    where = f"{metrics['dataset']} {metrics['split']}"
    table = Table(title=f"{where}: {metrics['n']} images, {metrics['patients']} patients")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% CI (patients)", justify="right")
    intervals = {"accuracy": "accuracy", "AUC": "auc", "sensitivity": "sensitivity", "specificity": "specificity"}
    for key, value in format_metrics_table(metrics):
        ci = (metrics.get("ci95") or {}).get(intervals.get(key, ""))
        table.add_row(key, value, f"{ci[0]:.4f} - {ci[1]:.4f}" if ci else "")
    if metrics.get("ece") is not None:
        table.add_row("ECE", f"{metrics['ece']:.4f}", f"temperature {metrics['temperature']:.3f}")
    console.print(table)
    cm = metrics["confusion_matrix"]
    if isinstance(cm, list):
        console.print("confusion matrix (rows true, columns predicted): " + ", ".join(metrics["labels"]))
        for label, row in zip(metrics["labels"], cm):
            console.print(f"  {label:>12} " + " ".join(f"{v:>6}" for v in row))
    print(out / "metrics.json")
