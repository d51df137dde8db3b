"""Where and how a run executes: device, precision, memory format, threads and data-parallel processes.

None of this changes what a recipe means. bf16 autocast is on by default where the hardware supports it
(AVX512-BF16 / AMX CPUs, bf16 GPUs); master weights stay fp32. channels_last is on by default everywhere: with
oneDNN it is faster in fp32 as well (measured by ``bench/inference.py`` on an AVX2 CPU: 1.15-1.73x at batch 32).

Threads: ``runtime.threads`` when set, while the run trains (:func:`shutdown` restores the count); otherwise, and
for prediction, PyTorch's own choice, which follows ``OMP_NUM_THREADS``, an earlier ``torch.set_num_threads`` and the
CPU affinity (one thread per usable core).

Under ``torchrun`` the process group is initialised from the environment (gloo on CPU, NCCL on GPU) and rank 0
alone writes files.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import distributed as dist

from cxrkit.errors import CxrError


def cpu_supports_bf16() -> bool:
    """True when the CPU has native bf16 arithmetic (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, so ``taskset`` and container limits count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """DataLoader workers: one per spare core, at most 4 (decoding must not starve the compute threads)."""
    return min(4, max(0, usable_cores() - 1))


@dataclass
class Runtime:
    """The resolved execution settings of one process."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    rank: int = 0
    world_size: int = 1
    workers: int = 0
    threads_before: int | None = None  # PyTorch's thread count before this runtime set its own; shutdown restores it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.dim() == 4:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def describe(self) -> str:
        ddp = f", {self.world_size} processes" if self.distributed else ""
        layout = ", channels_last" if self.channels_last else ""
        precision = self.precision
        if self.device.type == "cpu" and self.amp_dtype == torch.bfloat16 and not cpu_supports_bf16():
            precision += " (this CPU has no bf16 instructions; precision auto would use fp32)"
        return f"{self.device.type} {precision}{layout}, {torch.get_num_threads()} threads{ddp}"


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CxrError(f"runtime.device {name!r} is not a device (auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CxrError(f"runtime.device is {name} but no CUDA GPU is available")
    return device


def _resolve_amp(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else None


def setup_runtime(
    device: str = "auto", precision: str = "auto", channels_last: bool | None = None,
    threads: int | None = None, workers: int | None = None,
) -> Runtime:
    """Resolve the runtime; joins the ``torchrun`` process group when ``WORLD_SIZE`` > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = _resolve_device(device)
    if world_size > 1 and resolved.type == "cuda":
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    elif world_size > 1 and resolved.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
    else:
        threads_before = None
    amp = _resolve_amp(precision, resolved)
    layout = True if channels_last is None else channels_last
    cpu_ddp = world_size > 1 and resolved.type == "cpu"
    n_workers = workers if workers is not None else (0 if cpu_ddp else default_workers())
    return Runtime(resolved, amp, layout, rank, world_size, n_workers, threads_before)


def shutdown(runtime: Runtime) -> None:
    """Leave the process group, and give PyTorch back the thread count it had before :func:`setup_runtime`."""
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()
    if runtime.threads_before is not None:
        torch.set_num_threads(runtime.threads_before)
