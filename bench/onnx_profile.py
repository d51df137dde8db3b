"""Where ONNX Runtime spends its time on an ONNX model: the share of each operator type, from its own profiler.

For each model file given (a cxrkit export such as ``RUN/export/best.onnx`` or ``best.int8.onnx``, or any model with
one image input), this runs batches of random images in ONNX Runtime's CPU provider with the session options of
cxrkit's engines (:func:`cxrkit.export.onnx.session_options`, ``--threads`` intra-op threads), prints the throughput
of unprofiled batches (the median of ``--rounds`` rounds in which the models take turns, so that two files compare
fairly on a shared host), then profiles ``--runs`` more batches and prints the kernel time per operator type of the
graph ONNX Runtime actually ran (after its fusions: ``QLinearConv`` is a quantized convolution with its
DequantizeLinear and QuantizeLinear fused in). Operators that are not the network's own work (``Transpose``,
``QuantizeLinear``, ``DequantizeLinear``, or an fp32 ``BatchNormalization`` in an int8 graph) show where a graph
loses time.

    python bench/onnx_profile.py RUN/export/best.onnx RUN/export/best.int8.onnx
    python bench/onnx_profile.py model.onnx --batch 1 --size 224
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from options import positive


def session(path: Path, threads: int, profile_dir: str | None = None):
    """An ONNX Runtime session with the options of cxrkit's engines, profiling into ``profile_dir`` if given."""
    import onnxruntime as ort

    from cxrkit.export.onnx import session_options

    options = session_options(threads)
    options.log_severity_level = 3
    if profile_dir:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(profile_dir) / "ort")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def kernel_times(profile: str, skip_runs: int = 1) -> tuple[collections.Counter, dict[str, int]]:
    """Microseconds and number of nodes per operator type from an ONNX Runtime profile (Chrome trace JSON), leaving
    out the kernels of the first ``skip_runs`` runs (the warm-up: a cold first batch sets up its kernels)."""
    with open(profile) as f:
        events = json.load(f)
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    after = runs[skip_runs - 1]["ts"] + runs[skip_runs - 1]["dur"] if 0 < skip_runs <= len(runs) else 0
    times, names = collections.Counter(), collections.defaultdict(set)
    for event in events:
        if event.get("ts", 0) < after:
            continue
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event["args"]["op_name"]
            times[op] += event["dur"]
            names[op].add(event["name"])
    return times, {op: len(found) for op, found in names.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--batch", type=positive, default=32)
    parser.add_argument("--size", type=positive, default=224, help="height and width where the model's are not fixed")
    parser.add_argument("--runs", type=positive, default=2,
                        help="batches timed per round, and batches profiled (after one warm-up batch)")
    parser.add_argument("--rounds", type=positive, default=5, help="timing rounds; the models take turns in each")
    parser.add_argument("--threads", type=positive, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    plain, feeds, sizes = {}, {}, {}
    for path in args.models:
        if not path.is_file():
            parser.error(f"{path}: no such file")
        try:
            plain[path] = session(path, args.threads)
        except Exception as err:  # noqa: BLE001 - ONNX Runtime raises its own classes for a file it cannot load
            parser.error(f"{path}: ONNX Runtime cannot load it ({str(err).splitlines()[0][:200]})")
        spec = plain[path].get_inputs()[0]
        sizes[path] = tuple(d if isinstance(d, int) else args.size for d in spec.shape[2:4])
        feeds[path] = {spec.name: rng.standard_normal((args.batch, 3, *sizes[path])).astype(np.float32)}
        plain[path].run(None, feeds[path])  # warm-up
    # the models take turns, round after round, so that a slower spell of a shared host falls on all of them
    rates = collections.defaultdict(list)
    for _ in range(args.rounds):
        for path in args.models:
            start = time.perf_counter()
            for _ in range(args.runs):
                plain[path].run(None, feeds[path])
            rates[path].append(args.batch * args.runs / (time.perf_counter() - start))
    plain.clear()  # their idle threads spin for a while after a run, taking cores from the profiled session
    gc.collect()
    for path in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            profiled = session(path, args.threads, tmp)
            for _ in range(args.runs + 1):  # the first is a warm-up, left out of the kernel times
                profiled.run(None, feeds[path])
            times, nodes = kernel_times(profiled.end_profiling())
        total = sum(times.values())
        height, width = sizes[path]
        print(f"\n{path}: {height}x{width} px, batch {args.batch}, {args.threads} threads: "
              f"{statistics.median(rates[path]):.1f} img/s unprofiled (median of {args.rounds} rounds, "
              f"{min(rates[path]):.1f}-{max(rates[path]):.1f}); kernel time {total / args.runs / 1e3:.1f} ms per batch")
        print(f"{'operator':<28} {'ms/batch':>9} {'share':>7} {'nodes':>6}")
        for op, spent in times.most_common():
            print(f"{op:<28} {spent / args.runs / 1e3:>9.1f} {100 * spent / total:>6.1f}% {nodes[op]:>6}")


if __name__ == "__main__":
    main()
