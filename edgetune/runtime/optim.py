"""Optimizers with exactly PyTorch's update rules, state kept in named slots so a `.tod` can carry it.

The base class owns the bookkeeping (`step`, `zero_grad`, the step counter, the slots); each
variant implements only `update`, which reads like `torch.optim`'s documented algorithm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from edgetune.runtime.layers import Parameter


class Optimizer:
    """Updates `params` in place from their `.grad`.

    Args:
        params: the trainable tensors.
        lr: learning rate; mutable through `.lr` (schedules set it between steps).
        step_count: steps already taken (from a checkpoint); SGD's first step and Adam's bias
            correction depend on it.
    """

    slots: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Sequence[Parameter], lr: float, step_count: int = 0) -> None:
        if not (lr >= 0.0 and math.isfinite(lr)):
            raise ValueError(f"learning rate must be a finite number >= 0, got {lr}")
        self.params = list(params)
        self.lr = float(lr)
        self.step_count = int(step_count)
        self.state: dict[str, dict[str, np.ndarray]] = {
            p.name: {s: np.zeros_like(p.data) for s in self.slots} for p in self.params}

    def zero_grad(self) -> None:
        """Clear every parameter's gradient."""
        for p in self.params:
            p.grad[...] = 0

    def step(self) -> None:
        """Apply one update to every parameter and count it."""
        self.step_count += 1
        for p in self.params:
            self.update(p, self.state[p.name])

    def update(self, p: Parameter, state: dict[str, np.ndarray]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_state(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Take slot values from `optim/<param>/<slot>` tensors; absent slots stay zero (a fresh model)."""
        for p in self.params:
            for s in self.slots:
                t = tensors.get(f"optim/{p.name}/{s}")
                if t is not None:
                    if t.shape != p.data.shape:
                        raise ValueError(f"optimizer slot optim/{p.name}/{s} has shape {t.shape}, "
                                         f"parameter {p.data.shape}")
                    self.state[p.name][s] = np.array(t, dtype=np.float32)

    def state_tensors(self) -> dict[str, np.ndarray]:
        """Every slot as `optim/<param>/<slot>` tensors, for saving."""
        return {f"optim/{name}/{s}": v for name, slots in self.state.items() for s, v in slots.items()}


class SGD(Optimizer):
    """`torch.optim.SGD`: weight decay, momentum with dampening, Nesterov; buffer = grad on the first step."""

    slots = ("momentum_buffer",)

    def __init__(self, params: Sequence[Parameter], lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, step_count: int = 0) -> None:
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening (as torch.optim.SGD)")
        super().__init__(params, lr, step_count)
        self.momentum, self.dampening = float(momentum), float(dampening)
        self.weight_decay, self.nesterov = float(weight_decay), bool(nesterov)

    def update(self, p: Parameter, state: dict[str, np.ndarray]) -> None:
        d_p = p.grad + self.weight_decay * p.data if self.weight_decay else p.grad
        if self.momentum:
            buf = state["momentum_buffer"]
            if self.step_count == 1:
                buf[...] = d_p
            else:
                buf *= self.momentum
                buf += (1 - self.dampening) * d_p
            d_p = d_p + self.momentum * buf if self.nesterov else buf
        p.data -= self.lr * d_p



class Adam(Optimizer):
    """`torch.optim.Adam` (not AdamW): L2 weight decay added to the gradient, bias-corrected moments."""

    slots = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Sequence[Parameter], lr: float, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, step_count: int = 0) -> None:
        super().__init__(params, lr, step_count)
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps, self.weight_decay = float(eps), float(weight_decay)

    def update(self, p: Parameter, state: dict[str, np.ndarray]) -> None:
        g = p.grad + self.weight_decay * p.data if self.weight_decay else p.grad
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m += (g - m) * (1 - self.beta1)  # torch: exp_avg.lerp_(grad, 1 - beta1)
        v *= self.beta2
        v += (1 - self.beta2) * g * g
        t = self.step_count
        step_size = self.lr / (1 - self.beta1 ** t)
        denom = np.sqrt(v) / math.sqrt(1 - self.beta2 ** t) + self.eps
        p.data -= step_size * (m / denom)



OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "adam": Adam}


def make_optimizer(config: Mapping[str, Any], params: Sequence[Parameter], step_count: int = 0) -> Optimizer:
    """Build the optimizer a model's `meta["optimizer"]` names.

    Raises:
        ValueError: an unknown optimizer name or a bad setting.
    """
    name = config.get("name")
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)}")
    kwargs = {k: v for k, v in config.items() if k != "name"}
    try:
        return OPTIMIZERS[name](params, step_count=step_count, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad {name} settings {kwargs}: {e}") from None
