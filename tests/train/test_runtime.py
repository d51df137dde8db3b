"""Runtime resolution: threads, memory format and precision defaults."""

import os
import subprocess
import sys

import pytest
import torch

from cxrkit.train.runtime import cpu_supports_bf16, setup_runtime

PROBE = ("import torch; {before}from cxrkit.train.runtime import setup_runtime; "
         "r = setup_runtime('cpu'{args}); print(torch.get_num_threads(), r.describe())")


def _threads_in_child(env_threads: str | None, before: str = "", args: str = "") -> int:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if env_threads is not None:
        env["OMP_NUM_THREADS"] = env_threads
    out = subprocess.run([sys.executable, "-c", PROBE.format(before=before, args=args)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert f"{out[0]} threads" in " ".join(out)  # the log line says what is used
    return int(out[0])


def test_threads_default_to_the_cores_this_process_may_use():
    assert _threads_in_child(None) == len(os.sched_getaffinity(0))


def test_omp_num_threads_and_an_earlier_set_num_threads_are_respected():
    assert _threads_in_child("1") == 1
    assert _threads_in_child(None, before="torch.set_num_threads(1); ") == 1


def test_runtime_threads_setting_wins():
    assert _threads_in_child("1", args=", threads=3") == 3


def test_channels_last_is_on_by_default_and_can_be_switched_off():
    assert setup_runtime("cpu", "fp32").channels_last
    assert not setup_runtime("cpu", "fp32", channels_last=False).channels_last


def test_precision_auto_follows_the_cpu():
    runtime = setup_runtime("cpu", "auto")
    assert runtime.amp_dtype == (torch.bfloat16 if cpu_supports_bf16() else None)
    assert setup_runtime("cpu", "fp32").amp_dtype is None


def test_bf16_forced_on_a_cpu_without_bf16_instructions_says_so(monkeypatch):
    from cxrkit.train import runtime

    for native in (False, True):
        monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda native=native: native)
        described = setup_runtime("cpu", "bf16").describe()
        assert described.startswith("cpu bf16")
        assert ("no bf16 instructions" in described) is not native
    assert "no bf16" not in setup_runtime("cpu", "fp32").describe()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores to restrict to 1")
def test_threads_follow_a_restricted_cpu_affinity():
    """``taskset -c 0 cxr ...``: one core allowed, so one thread, not one per core of the machine."""
    code = PROBE.format(before="", args="")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    one = {min(os.sched_getaffinity(0))}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         preexec_fn=lambda: os.sched_setaffinity(0, one))
    assert int(out.stdout.split()[0]) == 1
