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

    from cxrkit.errors import CxrError

    console = Console()
    if layers is not None:
        if pattern != "*":
            raise CxrError(f"give a pattern ({pattern!r}) or --layers, not both")
        _print_layers(console, layers)
        return
    from cxrkit.models.backbones import list_backbones
    from cxrkit.models.weights import find_local_weights

    if not list_backbones(pattern):
        raise CxrError(f"no backbone matches {pattern!r}; `cxr models` lists them all")

    table = Table(title="backbones (--weights imagenet | none | FILE)")
    for column in ("name", "source", "input", "ImageNet weights"):
        table.add_column(column, no_wrap=column == "name")
    for spec in list_backbones(pattern):
        local = find_local_weights(spec.name)
        where = f"local: {local.name}" if local else "download"
        table.add_row(spec.name, f"{spec.source} {spec.arch}" if spec.arch != spec.name else spec.source,
                      f"{spec.input_size}px", where)
    console.print(table)
    console.print("local weights are searched in $CXR_WEIGHTS_DIR and ~/.cache/cxrkit/weights", highlight=False)


def _print_layers(console, name: str) -> None:
    from rich.table import Table

    from cxrkit.models.backbones import BACKBONES, block_names
    from cxrkit.models.classifier import build_classifier
    from cxrkit.models.freeze import layer_names

    model = build_classifier(name, 2, weights="none")
    blocks = block_names(model.backbone, BACKBONES.get(name))
    layers = layer_names(model.backbone)
    layer_rank = {n: len(layers) - i for i, n in enumerate(layers)}
    block_rank = {n: len(blocks) - i for i, n in enumerate(blocks)}
    table = Table(title=f"{name}: use top:N (layers), top:N:blocks or from:<name> in a stage's trainable")
    for column in ("name", "type", "top:N", "top:N:blocks"):
        table.add_column(column)
    for module_name, module in model.backbone.named_modules():
        if module_name in layer_rank or module_name in block_rank:
            table.add_row(module_name, type(module).__name__, str(layer_rank.get(module_name, "")),
                          str(block_rank.get(module_name, "")))
    console.print(table)
    console.print(f"{len(layers)} layers, {len(blocks)} blocks")
