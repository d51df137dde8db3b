"""Memory over a long Grad-CAM loop: cxrkit's Explainer vs the usual pytorch-grad-cam loop, in the same process.

The usual loop (the package's README pattern, written in a script's loop) builds ``GradCAM(model, target_layers)``
for every image. cxrkit opens one :class:`~cxrkit.explain.gradcam.Explainer` for the whole loop and drops the
retained graph after every batch. Every ``--bad-every``-th input is unreadable for the model (one channel instead
of three), and both loops do what a batch tool does: catch the error, keep it for the failure report, go on.

Three loops run: cxrkit with the bad inputs, the usual loop without them (its baseline), and the usual loop with
them. Printed per checkpoint: resident memory (RSS), the hooks attached to the model, and images per second; the
last lines give the growth of each.

    python bench/explain_memory.py --images 1000 --bad-every 10 --backbone mobilenet_v2 --size 224

Runs offline (random weights and inputs: memory behaviour does not depend on what the model learned).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from options import positive


def _hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())


def _rss_mib() -> float:
    """Current resident memory (Linux /proc; the peak from getrusage elsewhere)."""
    gc.collect()
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _input(x: torch.Tensor, i: int, bad_every: int) -> torch.Tensor:
    """The i-th input: ``x``, or a one-channel image the first convolution rejects."""
    return x[:, :1] if bad_every and i % bad_every == 0 else x


def usual_loop(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor, n: int, every: int,
               bad_every: int) -> tuple[list[tuple], int]:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    points, failures, start = [], [], time.perf_counter()
    for i in range(1, n + 1):
        try:
            cam = GradCAM(model=model, target_layers=[layer])
            cam(input_tensor=_input(x, i, bad_every), targets=[ClassifierOutputTarget(1)])
        except RuntimeError as err:
            failures.append((i, err))  # kept for the report; its traceback keeps that GradCAM and its hooks alive
        if i % every == 0:
            points.append((i, _rss_mib(), _hooks(model), i / (time.perf_counter() - start)))
    return points, len(failures)


def cxrkit_loop(model: torch.nn.Module, x: torch.Tensor, n: int, every: int, bad_every: int) -> tuple[list[tuple], int]:
    from cxrkit.explain.gradcam import Explainer

    points, failures, start = [], [], time.perf_counter()
    with Explainer(model, "binary") as explainer:
        for i in range(1, n + 1):
            try:
                explainer.heatmaps(_input(x, i, bad_every), [1])
            except RuntimeError as err:
                failures.append((i, err))
            if i % every == 0:
                points.append((i, _rss_mib(), _hooks(model), i / (time.perf_counter() - start)))
    points.append(("closed", _rss_mib(), _hooks(model), float("nan")))
    return points, len(failures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=positive, default=1000)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--size", type=positive, default=224)
    parser.add_argument("--every", type=positive, default=200)
    parser.add_argument("--bad-every", type=int, default=10, help="every n-th input fails (0: none)")
    args = parser.parse_args()
    if args.images < args.every:
        parser.error(f"--images {args.images} is below --every {args.every}: no memory reading would be taken")

    from cxrkit.explain.layers import resolve_layer
    from cxrkit.models.classifier import build_classifier

    torch.manual_seed(0)
    x = torch.randn(1, 3, args.size, args.size)
    print(f"{args.backbone} at {args.size}px, {args.images} images, every {args.bad_every}th one bad, "
          f"{torch.get_num_threads()} threads")
    loops = {"cxrkit, bad inputs": args.bad_every, "usual, no bad inputs": 0, "usual, bad inputs": args.bad_every}
    results = {}
    for name, bad_every in loops.items():
        model = build_classifier(args.backbone, 2, weights="none").eval()
        _, layer = resolve_layer(model)
        base = _rss_mib()
        points, failed = (cxrkit_loop(model, x, args.images, args.every, bad_every) if name.startswith("cxrkit")
                          else usual_loop(model, layer, x, args.images, args.every, bad_every))
        print(f"\n{name}: start RSS {base:.0f} MiB, {failed} inputs failed")
        print(f"{'images':>8} {'RSS MiB':>9} {'hooks':>6} {'img/s':>7}")
        for i, rss, hooks, rate in points:
            print(f"{i!s:>8} {rss:>9.0f} {hooks:>6} {rate:>7.1f}")
        first, last = points[0], [p for p in points if p[0] != "closed"][-1]
        results[name] = (last[1] - first[1], last[2], last[3])
        del model, points
        gc.collect()
    print()
    for name, (growth, hooks, rate) in results.items():
        print(f"{name:>22}: RSS growth {growth:+.0f} MiB from image {args.every} to {args.images}, "
              f"{hooks} hooks on the model, {rate:.1f} img/s")


if __name__ == "__main__":
    main()
