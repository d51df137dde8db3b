"""Feature caching: PyTorch vs ONNX Runtime as the engine that runs the frozen part (``runtime.cache_engine``).

For each backbone, the frozen part of a head-only stage (the whole backbone) and, with ``--top``, of a ``top:N``
stage (the model up to the boundary that cxrkit resumes from) runs over ``--images`` random 224 px images in
batches of ``--batch`` through :func:`cxrkit.train.features.extract_features`:

- ``torch``: what cxrkit runs with ``cache_engine: torch``: the runtime's defaults (bf16 autocast where the CPU has
  AVX512-BF16/AMX, else fp32; channels_last).
- ``onnx``: the frozen part exported to ONNX (the export is timed on its own) and run by ONNX Runtime in fp32.

Printed per row: both throughputs, the export time, the speed-up, and the break-even: the number of images from
which exporting and running ONNX Runtime takes less time than PyTorch, ``export / (1/torch - 1/onnx)``. Weights are
random (they do not change the speed); images come from memory, so decoding is not part of the time.

    python bench/cache_engine.py
    python bench/cache_engine.py --backbones mobilenet_v2 --top 14 --images 256
"""

from __future__ import annotations

import argparse
import time

import torch
from options import check_backbones, positive
from torch.utils.data import DataLoader, Dataset

BACKBONES = ("mobilenet_v2", "resnet18", "densenet121", "tf_efficientnet_lite0")


class RandomImages(Dataset):
    def __init__(self, n: int, size: int):
        self.x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "target": torch.tensor(0)}


def measure(name: str, top: int | None, args: argparse.Namespace) -> dict:
    from cxrkit.models.classifier import build_classifier
    from cxrkit.models.freeze import resolve_cut
    from cxrkit.train.features import extract_features
    from cxrkit.train.onnx_cache import OnnxFrozen
    from cxrkit.train.prefix import find_boundary
    from cxrkit.train.runtime import setup_runtime

    runtime = setup_runtime("cpu", "auto", workers=0)
    model = runtime.prepare_model(build_classifier(name, 3, weights="none")).eval()
    data = RandomImages(args.images, args.size)
    loader = DataLoader(data, batch_size=args.batch)
    boundary, net, what = None, model.backbone, "backbone"
    if top is not None:
        cut = resolve_cut(model.backbone, f"top:{top}")
        resumed = find_boundary(model, f"backbone.{cut}", runtime.to_device(data.x[:4]))
        if resumed is None:
            raise SystemExit(f"{name}: top:{top} cannot be resumed, so nothing is cached")
        boundary, net, what = resumed.boundary, model, f"top:{top} ({resumed.boundary.removeprefix('backbone.')})"
    extract_features(net, DataLoader(RandomImages(args.batch, args.size), batch_size=args.batch), runtime,
                     boundary=boundary)  # warm-up: oneDNN primitives
    start = time.perf_counter()
    extract_features(net, loader, runtime, boundary=boundary)
    torch_rate = args.images / (time.perf_counter() - start)
    engine = OnnxFrozen(net, boundary, args.size)
    start = time.perf_counter()
    engine.prepare()
    export = time.perf_counter() - start
    if engine.failed:
        raise SystemExit(f"{name}: the export failed")
    engine(data.x[: args.batch])  # warm-up and the check against PyTorch
    if engine.failed:  # the check found ONNX Runtime off PyTorch: extract_features would time PyTorch instead
        raise SystemExit(f"{name}: ONNX Runtime's output differs from PyTorch's, so cxrkit would not use it here")
    start = time.perf_counter()
    extract_features(net, loader, runtime, boundary=boundary, engine=engine)
    onnx_rate = args.images / (time.perf_counter() - start)
    saved = 1 / torch_rate - 1 / onnx_rate
    return {"backbone": name, "what": what, "precision": runtime.precision, "torch": torch_rate, "export": export,
            "onnx": onnx_rate, "break_even": export / saved if saved > 0 else float("inf")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--top", type=int, default=14, help="also time the prefix of a top:N stage (0: do not)")
    parser.add_argument("--images", type=positive, default=512)
    parser.add_argument("--batch", type=positive, default=64, help="the evaluation batch size cxrkit caches with")
    parser.add_argument("--size", type=positive, default=224)
    args = parser.parse_args()
    check_backbones(parser, args.backbones)
    if args.top < 0:
        parser.error(f"--top {args.top} is negative (0: time the backbone only)")
    if args.top:
        from cxrkit.models.classifier import build_classifier
        from cxrkit.models.freeze import resolve_cut

        for name in args.backbones:  # "" trains the whole backbone: no frozen prefix of a top:N stage to time
            if not resolve_cut(build_classifier(name, 3, weights="none").backbone, f"top:{args.top}"):
                parser.error(f"--top {args.top}: top:{args.top} trains all of {name}, so it has no frozen prefix to "
                             "cache; choose a smaller --top (or 0)")
    print(f"{torch.get_num_threads()} threads, {args.images} images of {args.size} px, batch {args.batch}",
          flush=True)
    print(f"{'backbone':<22} {'frozen part':<30} {'torch img/s':>11} {'export s':>9} {'onnx img/s':>10} "
          f"{'speed-up':>8} {'break-even':>10}", flush=True)
    for name in args.backbones:
        for top in (None, args.top) if args.top else (None,):
            r = measure(name, top, args)
            print(f"{r['backbone']:<22} {r['what']:<30} {r['torch']:>7.1f} {r['precision']:<4}"
                  f"{r['export']:>9.1f} {r['onnx']:>10.1f} {r['onnx'] / r['torch']:>7.2f}x {r['break_even']:>10.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
