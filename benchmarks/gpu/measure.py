"""Timing, peak memory, FLOP counts and the JSON report shared by the GPU benchmarks."""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import json
import platform
import re
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from align_diffusion.files import write_text_atomically

# Dense bf16 tensor-core peaks (TFLOP/s): half of the "with sparsity" BFLOAT16 Tensor Core figures on NVIDIA's data
# sheets (A100: its dense figure). Matched as whole words of the device name, the more specific names first: an
# "NVIDIA H100 PCIe" also holds "H100", and "NVIDIA H100 80GB HBM3" is the SXM board.
BF16_PEAK_TFLOPS = {"H100 PCIe": 756.5, "H100 NVL": 835.5, "H100": 989.5, "H200 NVL": 835.5, "H200": 989.5,
                    "A100": 312.0}
PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "peft", "open_clip_torch", "xformers")
GIB = 2**30


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine() or "cpu"


def bf16_peak(name: str) -> tuple[str, float] | None:
    """The table's (entry, dense bf16 peak) for a device name, or None when it does not know the device."""
    return next(((key, peak) for key, peak in BF16_PEAK_TFLOPS.items()
                 if re.search(rf"\b{re.escape(key)}\b", name, re.IGNORECASE)), None)


def environment(device: str) -> dict:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"device": device_name(device), "device_type": device.split(":")[0], "versions": versions,
            "cuda": torch.version.cuda, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def measured(device: str):
    """Yields a dict that receives `seconds` (wall clock, device synchronized) and, on CUDA, the peak allocated and
    reserved memory in GiB reached inside the block."""
    result = {}
    synchronize(device)
    if device.startswith("cuda"):
        # Resetting the peaks sets them to what is held now, cached blocks of earlier work included: free those
        # first, so the reserved peak is this block's own.
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    yield result
    synchronize(device)
    result["seconds"] = time.perf_counter() - start
    if device.startswith("cuda"):
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB


def attention_flops(query_shape, key_shape, value_shape) -> int:
    """An attention forward's matmul FLOPs: the scores q·kᵀ and their weighted sum of v."""
    batch, heads, queries, query_width = query_shape
    keys, value_width = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * queries * keys * (query_width + value_width)


def attention_forward_flops(query, key, value, *args, **kwargs) -> int:
    return attention_flops(query, key, value)


def attention_backward_flops(grad_out, query, key, value, *args, **kwargs) -> int:
    """Twice the forward's, the model FLOPs of a backward: torch counts a third matmul, the scores the kernel
    computes again, which MFU leaves out as it leaves out checkpointing's recomputation."""
    return 2 * attention_flops(query, key, value)


# SDPA's kernels (their arguments begin with query, key, value; a backward's with the gradient, then those): the
# CUDA backwards at model FLOPs, and the CPU's flash kernel, which FlopCounterMode does not count at all
ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_backward: attention_backward_flops,
    torch.ops.aten._scaled_dot_product_efficient_attention_backward: attention_backward_flops,
    torch.ops.aten._scaled_dot_product_cudnn_attention_backward: attention_backward_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: attention_forward_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: attention_backward_flops,
}


@contextlib.contextmanager
def counted_flops():
    """Yields a dict that receives `flops`: the model FLOPs of the matmuls, convolutions and attention run inside
    the block, forward and backward (torch's FlopCounterMode's counts, with SDPA's as `ATTENTION_FLOPS` gives
    them), and `flops_by_op`: {op name: FLOPs}."""
    result = {}
    counter = FlopCounterMode(display=False, custom_mapping=ATTENTION_FLOPS)
    with counter:
        yield result
    result["flops"] = counter.get_total_flops()
    result["flops_by_op"] = {str(op): count for op, count in counter.get_flop_counts().get("Global", {}).items()}


@contextlib.contextmanager
def profiled(device: str, top: int):
    """Yields a dict that receives, for the block run under torch.profiler: `seconds` (wall clock), `busy_seconds`
    (the kernels' summed time: low against the wall time means the host does not launch kernels fast enough),
    `busy_fraction`, `aten_ops` (the ATen op calls dispatched, nested ones included: the host's work), the `top`
    ops by the time of the kernels each launched, and the `top` kernels (on the CPU: ops by their own CPU time, and
    no kernels)."""
    result = {}
    on_cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if on_cuda else [ProfilerActivity.CPU]
    # The timer inside the profiler: the profiler's exit, which parses its trace, stays out of the time
    with profile(activities=activities) as profiler, measured(device) as timed:
        yield result
    events = profiler.key_averages()
    ops = [event for event in events if event.device_type == DeviceType.CPU]
    kernels = [event for event in events if event.device_type == DeviceType.CUDA]
    if on_cuda:
        seconds = lambda event: event.self_device_time_total / 1e6  # noqa: E731
        busy_seconds = sum(map(seconds, kernels))
    else:
        seconds = lambda event: event.self_cpu_time_total / 1e6  # noqa: E731
        busy_seconds = sum(map(seconds, ops))

    def ranked(rows):
        return [{"name": row.key, "calls": row.count, "seconds": seconds(row),
                 "share_of_busy": seconds(row) / busy_seconds} for row in sorted(rows, key=seconds, reverse=True)[:top]]

    result.update(seconds=timed["seconds"], busy_seconds=busy_seconds, busy_fraction=busy_seconds / timed["seconds"],
                  aten_ops=sum(op.count for op in ops if op.key.startswith("aten::")), top_ops=ranked(ops),
                  top_kernels=ranked(kernels))


def write_report(path: str | Path, benchmark: str, device: str, config: dict, results) -> dict:
    """{benchmark, environment, config, results} as JSON at `path` (folders created); returns it."""
    report = {"benchmark": benchmark, "environment": environment(device), "config": config, "results": results}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(report, indent=2) + "\n")  # a cap's kill keeps the earlier report whole
    print(json.dumps(results, indent=2))
    return report


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
