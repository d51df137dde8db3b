"""``cxr models``: the registered backbones, or the layer names of one (for ``from:<layer>`` cut-offs)."""

from __future__ import annotations

from typing import Optional

import typer


def models(
    pattern: str = typer.Argument("*", help="Filter names, e.g. 'mobilenet*'"),
    layers: Optional[str] = typer.Option(None, "--layers", help="List the layers and blocks of this backbone"),
) -> None:
    """List backbones with their input size, weights source and local weights."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if layers is not None:
        _print_layers(console, layers)
        return
    from cxrkit.models.backbones import list_backbones
    from cxrkit.models.weights import find_local_weights

    table = Table(title="backbones (weights: imagenet | none | FILE)")
    for column in ("name", "source", "arch", "input", "local ImageNet weights"):
        table.add_column(column)
    for spec in list_backbones(pattern):
        local = find_local_weights(spec.name)
        table.add_row(spec.name, spec.source, spec.arch, f"{spec.input_size}px", str(local) if local else "-")
    console.print(table)


def _print_layers(console, name: str) -> None:
    from cxrkit.models.backbones import BACKBONES, block_names
    from cxrkit.models.classifier import build_classifier
    from cxrkit.models.freeze import layer_names

    model = build_classifier(name, 2, weights="none")
    blocks = set(block_names(model.backbone, BACKBONES.get(name)))
    names = layer_names(model.backbone)
    for i, layer in enumerate(names):
        mark = "  block" if layer in blocks else ""
        console.print(f"{len(names) - i:>4}  {layer}{mark}", highlight=False)
    console.print(f"{len(names)} layers (top:N counts from the bottom of this list), {len(blocks)} blocks")
