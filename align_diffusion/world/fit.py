"""The optimization loop every world model trains with: AdamW, one-cycle learning rate, optional grad-norm
clipping, and a progress line every `log_every` steps."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch


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
) -> None:
    """Runs `steps` optimizer steps on the loss `batch_loss()` returns for a fresh batch."""
    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=warmup)
    start = time.time()
    for step in range(steps):
        loss = batch_loss()
        optimizer.zero_grad()
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps - 1:
            log(f"{name} step {step + 1}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f}s)")
