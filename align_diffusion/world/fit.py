"""The optimization loop every world model trains with: AdamW, one-cycle learning rate, optional grad-norm
clipping, optional bfloat16 autocast, and a progress line every `log_every` steps."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


@contextlib.contextmanager
def bf16_autocast():
    """CPU bfloat16 autocast. Its matmuls and convolutions run on the CPU's AMX units where it has them (~2.5×
    faster on the build machines); attention takes the math kernel, because the fused CPU kernel's bfloat16
    backward is ~5× slower than float32 at the world's sizes (64–100 tokens)."""
    with torch.autocast("cpu", torch.bfloat16), sdpa_kernel(SDPBackend.MATH):
        yield


def fit(
    name: str,
    params: Iterable[torch.nn.Parameter],
    steps: int,
    lr: float,
    batch_loss: Callable[[], torch.Tensor],
    log=print,
    weight_decay: float = 0.01,
    warmup: float = 0.1,
    max_grad_norm: float | None = None,
    log_every: int = 50,
    bf16: bool = False,
) -> None:
    """Runs `steps` optimizer steps on the loss `batch_loss()` returns for a fresh batch; with `bf16` the loss is
    computed under CPU bfloat16 autocast (float32 weights and optimizer state)."""
    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    # OneCycleLR divides its warm-up by (pct_start · steps − 1): a warm-up of exactly one step would be 0 / 0.
    pct_start = 2 / steps if math.isclose(warmup * steps, 1) else warmup
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=pct_start)
    start = time.time()
    for step in range(steps):
        with bf16_autocast() if bf16 else contextlib.nullcontext():
            loss = batch_loss()
        optimizer.zero_grad()
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps - 1:
            log(f"{name} step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
