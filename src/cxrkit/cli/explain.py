"""``cxr explain``: Grad-CAM (and family) heatmaps for images, or study 3's grid for a split."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def explain(
    ctx: typer.Context,
    run: Path = typer.Argument(..., help="Run directory"),
    inputs: Optional[list[str]] = typer.Argument(None, help="Image files, folders or glob patterns"),
    grid: bool = typer.Option(False, "--grid", help="Examples of each (true, predicted) cell of a split"),
    split: str = typer.Option("test", "--split", help="Split for --grid"),
    data: Optional[str] = typer.Option(None, "--data", help="Dataset for --grid (default: the run's own)"),
    map_: list[str] = typer.Option([], "--map", help="For --data: map a dataset label to a model label: A=B"),
    per_cell: int = typer.Option(3, "--per-cell", help="Examples per cell of the grid"),
    pick: str = typer.Option("confident", "--pick", help="Grid examples: confident or random"),
    method: str = typer.Option("gradcam", "--method", "-m",
                               help="gradcam, gradcam++, xgradcam, layercam, hirescam, eigengradcam, scorecam, "
                                    "eigencam"),
    layer: Optional[str] = typer.Option(None, "--layer", help="Target layer (default: the backbone's CAM layer)"),
    target: list[str] = typer.Option([], "--target", "-t", help="Class to explain (repeatable), or 'all'; "
                                                                 "default: the predicted class / positive labels"),
    check: bool = typer.Option(True, "--check/--no-check", help="Faithfulness check (ROAD removal vs random)"),
    remove: float = typer.Option(20.0, "--remove", help="Percent of pixels the check removes"),
    random_maps: int = typer.Option(3, "--random-maps", help="Random regions the check compares with"),
    opacity: float = typer.Option(0.45, "--opacity", help="Heatmap opacity in the overlays"),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per forward/backward pass"),
    seed: int = typer.Option(0, "--seed"),
    checkpoint: str = typer.Option("best", "--checkpoint", help="best or last"),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: RUN/explain/<method>)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo images already explained in --out"),
) -> None:
    """Heatmaps over images (PNG overlay + raw .npy + a faithfulness check), or --grid for a split."""
    from cxrkit.cli.evaluate import parse_label_map
    from cxrkit.console import notes_console
    from cxrkit.errors import CxrError
    from cxrkit.explain.api import ExplainOptions, option_problem
    from cxrkit.explain.gradcam import method_info

    if bool(inputs) == grid:
        raise CxrError("give images to explain, or --grid for a split (not both)")
    given = [f"--{name.rstrip('_').replace('_', '-')}"
             for name in (("overwrite",) if grid else ("split", "data", "map_", "per_cell", "pick"))
             if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") != "DEFAULT"]  # typer's own click
    if given:
        raise CxrError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for "
                       f"{'images, not --grid' if grid else '--grid'}")
    method_info(method)
    if why := option_problem({"percent": remove, "opacity": opacity, "batch_size": batch_size, "n_random": random_maps},
                             {"percent": "--remove", "opacity": "--opacity", "batch_size": "--batch-size",
                              "n_random": "--random-maps"}):
        raise CxrError(why)
    options = ExplainOptions(method, layer, tuple(target), check, remove, random_maps, opacity, batch_size, seed)
    console = notes_console()
    from cxrkit.serve.predictor import Predictor

    predictor = Predictor(run, checkpoint=checkpoint)
    out_dir = out or predictor.run.path / "explain" / method.lower().replace("+", "p")
    if out_dir.exists() and not out_dir.is_dir():
        raise CxrError(f"--out {out_dir} is a file, not a folder")
    if grid:
        from cxrkit.explain.grid import explain_grid

        for result in explain_grid(predictor, out_dir, options, data, split, parse_label_map(map_) or None,
                                   per_cell, pick, console=console):
            if result.summary:
                console.print(f"{result.examples} examples, heatmap vs random region: {result.summary}",
                              highlight=False)
            print(result.csv)
            print(result.png)
        return
    _explain_inputs(predictor, inputs or [], out_dir, options, overwrite, console)


def _explain_inputs(predictor, inputs: list[str], out_dir: Path, options, overwrite: bool, console) -> None:
    import sys

    from cxrkit.errors import CxrError
    from cxrkit.explain.api import explain_files, verdict_summary
    from cxrkit.serve.predictor import expand_inputs
    from cxrkit.train.loop import make_progress

    paths = expand_inputs(inputs)
    if not paths:
        raise CxrError("no image found in " + " ".join(inputs))
    with make_progress(console) as progress:
        result = explain_files(predictor, paths, out_dir, options, overwrite, progress)
    checks = [r for r in result.rows if r.get("verdict")]
    heatmaps = f"{len(result.rows)} heatmap{'' if len(result.rows) == 1 else 's'}"
    if checks:
        console.print(f"{heatmaps}, heatmap vs random region: {verdict_summary(checks)}", highlight=False)
    elif result.rows:
        console.print(f"{heatmaps} (no faithfulness check)", highlight=False)
    if result.skipped:
        images = "image was" if result.skipped == 1 else "images were"
        console.print(f"{result.skipped} {images} already explained in {out_dir} with these settings (--overwrite "
                      "redoes them)", highlight=False)
    if result.redone:
        images = "image" if result.redone == 1 else "images"
        console.print(f"{result.redone} {images} explained before with other settings in {out_dir} were explained "
                      "again", highlight=False)
    for _path, reason in result.failed:
        print(f"error: {reason}", file=sys.stderr)
    print(out_dir / "explain.csv")
    if result.failed:
        print(f"{len(result.failed)} of {len(paths)} files could not be explained", file=sys.stderr)
        raise typer.Exit(1)
