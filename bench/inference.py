"""Inference speed per backbone: naive fp32 eager PyTorch vs cxrkit's path vs ONNX Runtime, at 224 px.

For each backbone (a cxrkit classifier with a 2-class head; random weights, which do not change the speed):

- ``naive``: what a typical script does: the model in fp32, ``model.eval()``, ``torch.no_grad()``, NCHW tensors.
- ``cxrkit``: what ``cxr predict`` and ``cxr evaluate --engine torch`` run: the runtime resolved from the defaults
  (bf16 autocast and channels_last where the CPU has AVX512-BF16/AMX, fp32 otherwise), under ``inference_mode``.
- ``fp32-cl``: fp32 with channels_last (to show what the memory format alone does on this CPU).
- ``onnx``: ``cxr predict --engine onnx``: the model exported by cxrkit and run by ONNX Runtime's CPU provider.
- ``int8``: ``cxr predict --engine onnx-int8``: that export quantized by cxrkit (:mod:`cxrkit.export.quantize`),
  with activation ranges from 32 random inputs here (the ranges change the values, not the speed; a run uses its
  training images). int8 changes the outputs: this measures speed only. ``--fp32-convs 0 10`` adds a row per count
  of leading convolutions kept in fp32 (``cxr export -f onnx-int8 --fp32-convs N``).

Printed per backbone and mode: batch-1 latency (median of ``--latency-runs``) and batch-``--batch`` throughput,
its ratio to ``naive``, and the FLOP rate reached as a fraction of the CPU's peak. Throughput is timed in
``--rounds`` rounds (``--throughput-batches`` batches per mode and round, after one warm-up batch per mode) in which
the modes take turns, so that a slower spell of a shared host falls on all of them. Each round gives each mode a
rate and a ratio to that round's naive rate; the table prints the medians over the rounds and the range of the
ratio (lowest to highest round). FLOPs per image are counted by ``torch.utils.flop_counter`` (a multiply-add
is 2 FLOPs). The peak is ``cores x clock x FLOPs per cycle per core``: the clock is the base clock of
/sys/devices/system/cpu/cpu0/cpufreq/base_frequency where the kernel states it, else ``cpu MHz`` of /proc/cpuinfo (no
boost), and FLOPs per cycle assume two FMA pipes: fp32 = 2 pipes x 2 (FMA) x 8 lanes (256-bit
AVX2, and AVX-512 on AMD's Zen 4, CPU family 25, which splits it over 256-bit pipes) or x 16 lanes (AVX-512 on
Intel and on AMD's Zen 5, family 26, whose pipes are 512 bits wide); bf16 with AVX512-BF16 or AMX doubles
the fp32 figure (VDPBF16PS does two multiply-adds per fp32 lane); AMX tiles multiply faster still, so on a CPU
with AMX the bf16 share can pass 100% (the printed peak says so). Each round also times a 2048-square fp32 matrix
product (``torch.mm`` and numpy); its median rate is what fp32 reached on this machine in practice during the
rounds. Preprocessing is not timed (tensors in, logits out).

    python bench/inference.py
    python bench/inference.py --backbones mobilenet_v2 --batch 16
    python bench/inference.py --modes naive onnx int8 --fp32-convs 0 6 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from options import check_backbones, positive

BACKBONES = ("mobilenet_v2", "resnet18", "densenet121", "tf_efficientnet_lite0")
MODES = ("naive", "cxrkit", "fp32-cl", "onnx", "int8")


def cpu_peak_gflops(cores: int) -> tuple[dict[str, float], str]:
    """Peak GFLOP/s for fp32 and (where the CPU has it) bf16, and how they were computed."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    base = Path("/sys/devices/system/cpu/cpu0/cpufreq/base_frequency")  # kHz, where the kernel states it
    mhz = int(base.read_text()) / 1000 if base.is_file() else next(
        (float(line.split(":", 1)[1]) for line in text.splitlines() if line.startswith("cpu MHz")), 0.0)
    clock = "base clock" if base.is_file() else "cpu MHz of /proc/cpuinfo"
    vendor = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("vendor_id")), "")
    family = next((int(line.split(":", 1)[1]) for line in text.splitlines() if line.startswith("cpu family")), 0)
    wide = vendor == "GenuineIntel" or (vendor == "AuthenticAMD" and family >= 26)  # 512-bit pipes: Intel, Zen 5
    lanes = 16 if "avx512f" in flags and wide else 8 if "avx2" in flags else 4
    fp32_per_cycle = 2 * 2 * lanes
    peaks = {"fp32": cores * mhz / 1000 * fp32_per_cycle}
    bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    if bf16:
        peaks["bf16"] = 2 * peaks["fp32"]
    how = (f"{cores} cores x {mhz:.0f} MHz ({clock}) x {fp32_per_cycle} fp32 FLOPs/cycle (2 FMA pipes x {lanes} "
           f"lanes, {vendor or 'unknown vendor'} family {family})" + (", bf16 x2" if bf16 else ", no bf16 instructions")
           + ("; AMX tiles multiply faster than this bf16 figure, so its % of peak can pass 100" if "amx_bf16" in flags
              else ""))
    return peaks, how


MATMUL_SIDE = 2048


def matmul_products() -> dict[str, Callable[[], object]]:
    """Two ``MATMUL_SIDE``-square fp32 matrix products, by ``torch.mm`` and by numpy (its BLAS): timed in each round
    beside the models, they show what fp32 reaches on this machine in practice at that moment, which the nominal
    peak (no boost clock, no memory) does not."""
    import numpy as np

    a, b = torch.randn(MATMUL_SIDE, MATMUL_SIDE), torch.randn(MATMUL_SIDE, MATMUL_SIDE)
    return {"torch.mm": lambda: torch.mm(a, b), "numpy": lambda: np.matmul(a.numpy(), b.numpy())}


def flops_per_image(model: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def _time(fn, x: torch.Tensor, runs: int) -> list[float]:
    fn(x)  # warm-up: oneDNN primitive creation, ONNX Runtime allocation
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return times


def runners(name: str, model: torch.nn.Module, size: int, tmp: Path, modes: list[str], fp32_convs: list[int]):
    """``mode -> (callable on an NCHW float batch, precision)``, built as each mode's user would build it."""
    import copy

    from cxrkit.export.onnx import OnnxModel, export_onnx
    from cxrkit.train.runtime import setup_runtime

    out = {}
    if "naive" in modes:
        naive = copy.deepcopy(model).eval()

        def run_naive(x):
            with torch.no_grad():
                return naive(x)

        out["naive"] = (run_naive, "fp32")
    if "cxrkit" in modes:
        runtime = setup_runtime("cpu")  # the CPU's path, as every other mode (a GPU must not take part)
        fast = runtime.prepare_model(copy.deepcopy(model)).eval()

        def run_cxrkit(x):
            with torch.inference_mode(), runtime.autocast():
                return fast(runtime.to_device(x))

        out["cxrkit"] = (run_cxrkit, runtime.precision + (", channels_last" if runtime.channels_last else ""))
    if "fp32-cl" in modes:
        cl = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)

        def run_cl(x):
            with torch.inference_mode():
                return cl(x.contiguous(memory_format=torch.channels_last))

        out["fp32-cl"] = (run_cl, "fp32, channels_last")
    if "onnx" in modes or "int8" in modes:
        path = export_onnx(model, tmp / f"{name}.onnx", size, {"backbone": name})
        if "onnx" in modes:
            out["onnx"] = (OnnxModel(path), "fp32 (ONNX Runtime)")
        if "int8" in modes:
            from cxrkit.export.quantize import quantize_int8

            generator = torch.Generator().manual_seed(1)
            batches = [torch.randn(8, 3, size, size, generator=generator).numpy() for _ in range(4)]
            for kept in fp32_convs:
                start = time.perf_counter()
                int8 = quantize_int8(path, tmp / f"{name}.int8-{kept}.onnx", iter(batches), len(batches),
                                     {"backbone": name}, fp32_convs=kept)
                print(f"{'':<22} int8 quantization took {time.perf_counter() - start:.1f} s", flush=True)
                out[f"int8 f{kept}" if kept else "int8"] = (
                    OnnxModel(int8), f"int8, first {kept} convs fp32" if kept else "int8 (ONNX Runtime)")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--size", type=positive, default=224)
    parser.add_argument("--batch", type=positive, default=32)
    parser.add_argument("--latency-runs", type=positive, default=20)
    parser.add_argument("--throughput-batches", type=positive, default=1, help="batches per mode in each round")
    parser.add_argument("--rounds", type=positive, default=5, help="throughput rounds; the modes take turns in each")
    parser.add_argument("--fp32-convs", nargs="+", type=int, default=[0],
                        help="int8 mode: leading convolutions kept in fp32, one row per count")
    args = parser.parse_args()
    if "naive" not in args.modes:
        parser.error("--modes must include naive (the baseline of every ratio)")
    check_backbones(parser, args.backbones)

    from cxrkit.models.classifier import build_classifier
    from cxrkit.train.runtime import setup_runtime

    cores = len(os.sched_getaffinity(0))
    peaks, how = cpu_peak_gflops(cores)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cores} cores; "
          f"cxrkit runtime here: {setup_runtime('cpu').describe()}")
    print(f"peak: {', '.join(f'{k} {v:.0f} GFLOP/s' for k, v in peaks.items())} ({how})")
    products = matmul_products()
    print(f"{args.size} px; latency = median of {args.latency_runs} batch-1 calls; throughput = median of "
          f"{args.rounds} rounds of {args.throughput_batches} batch(es) of {args.batch} per mode, modes in turn\n")
    header = (f"{'backbone':<22} {'mode':<8} {'precision':<26} {'b1 ms':>8} {'img/s':>8} {'x naive':>8} "
              f"{'x range':>11} {'% peak':>7}")
    print(header)
    print("-" * len(header))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.backbones:
            model = build_classifier(name, 2, weights="none").eval()
            flops = flops_per_image(model, args.size)
            modes = runners(name, model, args.size, Path(tmp), args.modes, args.fp32_convs)
            one = torch.randn(1, 3, args.size, args.size)
            batch = torch.randn(args.batch, 3, args.size, args.size)
            latency = {mode: statistics.median(_time(fn, one, args.latency_runs)) * 1000
                       for mode, (fn, _) in modes.items()}
            rates: dict[str, list[float]] = {mode: [] for mode in modes}
            gflops: dict[str, list[float]] = {product: [] for product in products}
            for fn, _ in modes.values():
                fn(batch)  # warm-up at the batch size
            for product in products.values():
                product()
            for _ in range(args.rounds):
                for mode, (fn, _) in modes.items():
                    start = time.perf_counter()
                    for _ in range(args.throughput_batches):
                        fn(batch)
                    rates[mode].append(args.batch * args.throughput_batches / (time.perf_counter() - start))
                for product, multiply in products.items():
                    start = time.perf_counter()
                    multiply()
                    gflops[product].append(2 * MATMUL_SIDE**3 / (time.perf_counter() - start) / 1e9)
            for mode, (_, precision) in modes.items():
                ratios = [rate / naive for rate, naive in zip(rates[mode], rates["naive"])]
                rate = statistics.median(rates[mode])
                peak = peaks["bf16"] if precision.startswith("bf16") else peaks["fp32"]
                # no int8 peak is stated: its multiply-adds take several instructions on AVX2 (and fewer with VNNI)
                share = "-" if precision.startswith("int8") else f"{100 * rate * flops / 1e9 / peak:.1f}%"
                spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
                print(f"{name:<22} {mode:<8} {precision:<26} {latency[mode]:>8.1f} {rate:>8.1f} "
                      f"{statistics.median(ratios):>8.2f} {spread:>11} {share:>7}", flush=True)
            print(f"{'':<22} {flops / 1e9:.2f} GFLOPs per image; fp32 {MATMUL_SIDE}-square matrix product in the same "
                  "rounds: " + ", ".join(f"{k} {statistics.median(v):.0f} GFLOP/s "
                                         f"({100 * statistics.median(v) / peaks['fp32']:.0f}% of peak)"
                                         for k, v in gflops.items()))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
