"""The optimizer: `Optimizer` owns the step, the gradient reset, the learning rate and the state slots;
each algorithm is one registered entry (`OPTIMIZERS`) holding its settings and its update rule.

An entry is a frozen dataclass: the host builds one to write `meta["optimizer"]` (`to_meta`), the
device reads it back (`from_meta`) and `Optimizer` applies its `update`, which reads like PyTorch's
documented algorithm (tinygrad's shape: the base owns `step`/`zero_grad`, a variant only its rule).
A new algorithm is one `@register_optimizer` class plus its test against torch. Slots (momentum,
moments) are kept by name so a `.tod` carries them (`optim/<param>/<slot>`, docs/FORMAT.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from edgetune.errors import UserError
from edgetune.runtime.ops import Parameter
from edgetune.runtime.workers import run_workers


class TrainingDiverged(UserError):
    """The loss, a gradient or an updated weight is not finite: the step was not applied, so no bad weights exist."""


@dataclass(frozen=True)
class Algorithm:
    """Base of the optimizer entries: settings (dataclass fields, `lr` first) and the update rule.

    Settings are checked when the entry is made (`UserError` naming the bad one), so a bad setting
    fails at export on the host or at load on the device, never at the first step.
    """

    name: ClassVar[str] = ""
    slots: ClassVar[tuple[str, ...]] = ()  # per-parameter state tensors, zero in a fresh model

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # each setting has the kind of its default
            value = getattr(self, f.name)
            if isinstance(f.default, bool):
                if not isinstance(value, bool):
                    raise UserError(f"{self.name} {f.name} must be true or false, got {value!r}")
            elif isinstance(f.default, tuple):
                if not (isinstance(value, (list, tuple)) and len(value) == len(f.default)
                        and all(_is_number(v) and math.isfinite(v) for v in value)):
                    raise UserError(f"{self.name} {f.name} must be {len(f.default)} numbers, got {value!r}")
                object.__setattr__(self, f.name, tuple(float(v) for v in value))
            elif not (_is_number(value) and math.isfinite(value) and value >= 0):
                raise UserError(f"{self.name} {f.name} must be a finite number >= 0, got {value!r}")
        self.check()

    def check(self) -> None:
        """Rules between settings (all are already finite numbers >= 0 or booleans)."""

    def update(self, data: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], step: int, lr: float) -> None:
        """Update `data` in place from `grad` and the slots in `state`; `step` counts from 1.

        Element-wise, so the optimizer applies it to cache-sized blocks of a parameter (views of
        the parameter, its gradient and its slots) rather than whole tensors: 2x faster.
        """
        raise NotImplementedError  # pragma: no cover - every entry implements it

    @classmethod
    def settings(cls) -> tuple[str, ...]:
        """The names of the settings, in `meta` order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_meta(self) -> dict[str, Any]:
        """The `meta["optimizer"]` object (docs/FORMAT.md)."""
        settings = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"name": self.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}}

    @staticmethod
    def from_meta(config: Mapping[str, Any]) -> Algorithm:
        """The entry a `meta["optimizer"]` object describes; every setting must be present.

        Raises:
            UserError: an unknown name, a missing or unknown setting, or a bad value.
        """
        name = config.get("name") if isinstance(config, Mapping) else None
        if not isinstance(name, str) or name not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)}")
        cls = OPTIMIZERS[name]
        given, known = set(config) - {"name"}, set(cls.settings())
        if given != known:
            raise UserError(f"bad {name} settings {dict(config)}: missing {sorted(known - given)}, "
                            f"unknown {sorted(given - known)}")
        return cls(**{k: v for k, v in config.items() if k != "name"})


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


OPTIMIZERS: dict[str, type[Algorithm]] = {}
UPDATE_BLOCK = 1 << 16  # elements per block of an update (256 KB of float32 per array: about an L2 cache)
BLOCKS_PER_THREAD = 4  # fewer blocks run on the caller's thread alone (the head: starting a thread costs more)


def register_optimizer(name: str) -> Callable[[type[Algorithm]], type[Algorithm]]:
    """Class decorator: enter an `Algorithm` in `OPTIMIZERS` under the name `meta["optimizer"]` uses."""

    def enter(cls: type[Algorithm]) -> type[Algorithm]:
        if name in OPTIMIZERS:
            raise ValueError(f"optimizer {name} is registered twice")
        cls.name = name
        OPTIMIZERS[name] = cls
        return cls

    return enter


@register_optimizer("sgd")
@dataclass(frozen=True)
class SGD(Algorithm):
    """`torch.optim.SGD`: weight decay, momentum with dampening, Nesterov; buffer = grad on the first step.

    The defaults are the seed's settings (momentum 0.9, dampening 0.01, lr 0.0015).
    """

    lr: float = 0.0015
    momentum: float = 0.9
    dampening: float = 0.01
    weight_decay: float = 0.0
    nesterov: bool = False

    slots = ("momentum_buffer",)

    def check(self) -> None:
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise UserError("Nesterov momentum needs momentum > 0 and dampening 0 (as torch.optim.SGD)")

    def update(self, data: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], step: int, lr: float) -> None:
        d_p = grad + self.weight_decay * data if self.weight_decay else grad
        t = np.empty_like(data)  # the one temporary: each line below is one pass, in place
        if self.momentum:
            buf = state["momentum_buffer"]
            if step == 1:
                buf[...] = d_p
            else:
                buf *= self.momentum
                buf += np.multiply(d_p, 1 - self.dampening, out=t)
            d_p = d_p + self.momentum * buf if self.nesterov else buf
        data -= np.multiply(d_p, lr, out=t)


@register_optimizer("adam")
@dataclass(frozen=True)
class Adam(Algorithm):
    """`torch.optim.Adam` (not AdamW): L2 weight decay added to the gradient, bias-corrected moments."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    slots = ("exp_avg", "exp_avg_sq")

    def check(self) -> None:
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise UserError(f"Adam betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not self.eps > 0:
            raise UserError(f"Adam eps must be > 0, got {self.eps}")

    def update(self, data: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], step: int, lr: float) -> None:
        g = grad + self.weight_decay * data if self.weight_decay else grad
        self._adam(data, g, state, step, lr)

    def _adam(self, data: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray], step: int, lr: float) -> None:
        """The moments and the step, in place through one temporary: the same float32 operations in
        the same order as the textbook lines in the comments, without their five temporaries."""
        beta1, beta2 = self.betas
        m, v = state["exp_avg"], state["exp_avg_sq"]
        t = np.subtract(g, m)
        t *= 1 - beta1
        m += t  # m += (g - m) * (1 - beta1); torch: exp_avg.lerp_(grad, 1 - beta1)
        v *= beta2
        np.multiply(g, 1 - beta2, out=t)
        t *= g
        v += t  # v = beta2 v + (1 - beta2) g g
        np.sqrt(v, out=t)
        t /= math.sqrt(1 - beta2 ** step)
        t += self.eps  # denom = sqrt(v) / sqrt(1 - beta2^step) + eps
        np.divide(m, t, out=t)
        t *= lr / (1 - beta1 ** step)
        data -= t  # p -= lr / (1 - beta1^step) * m / denom



@register_optimizer("adamw")
@dataclass(frozen=True)
class AdamW(Adam):
    """`torch.optim.AdamW`: Adam with decoupled weight decay, `p *= 1 - lr * weight_decay` before the step.

    Adam's L2 decay passes through the moments, so a weight with large gradients is barely decayed;
    AdamW shrinks every weight by the same factor (Loshchilov & Hutter). PyTorch's default decay, 0.01.
    """

    weight_decay: float = 1e-2

    def update(self, data: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], step: int, lr: float) -> None:
        if self.weight_decay:
            data *= 1 - lr * self.weight_decay
        self._adam(data, grad, state, step, lr)

class Optimizer:
    """Updates parameters from their accumulated gradients (the shape of ONNX Runtime training's `Optimizer`).

    `zero_grad` clears the gradients, the module's backward passes add to them (one batch, or
    several for a larger virtual batch), and `step` applies one update: gradients can be inspected
    or accumulated in between.

    Parameter groups (torch's `param_groups`, `meta["param_groups"]` in a model) are learning-rate
    factors: parameter `p` trains at `lr * lr_scales[p]` (1 when absent). A schedule changes `lr`,
    so every group's rate follows it and the ratios stay. Each update rule sees its group's rate
    as `lr`, which is exactly what torch does with a group whose lr is that rate (AdamW's decoupled
    decay included).

    Args:
        params: the parameters (a `Module`'s `parameters()`).
        algorithm: the settings and update rule, e.g. `SGD(lr=0.01)`.
        step_count: steps already taken (from a checkpoint): SGD's first step and Adam's bias
            correction depend on it.
        lr_scales: learning-rate factor by parameter name (parameter groups); absent names train at `lr`.
        threads: threads an update runs on (numpy's loops release the GIL); the result does not depend on it.
    """

    def __init__(self, params: Sequence[Parameter], algorithm: Algorithm, step_count: int = 0,
                 lr_scales: Mapping[str, float] | None = None, threads: int = 1) -> None:
        self.params = list(params)
        self.threads = max(1, int(threads))
        self.algorithm = algorithm
        self.lr = float(algorithm.lr)  # the live rate: schedules change it between steps
        self.step_count = int(step_count)
        self.lr_scales = {p.name: float((lr_scales or {}).get(p.name, 1.0)) for p in self.params}
        self.state: dict[str, dict[str, np.ndarray]] = {
            p.name: {s: np.zeros_like(p.data) for s in algorithm.slots} for p in self.params}

    def zero_grad(self) -> None:
        """Clear every parameter's gradient."""
        for p in self.params:
            p.grad[...] = 0

    def step(self) -> None:
        """Apply one update to every parameter and count it; kept only if every weight and slot stays finite.

        A finite gradient can still overflow float32 in the update (a huge learning rate, weights
        near float32's max). Such a step is undone (parameters, slots and step count restored from
        copies each block takes before its update: the trainable part is small, the copy cheap) so
        that no session, and hence no checkpoint, ever holds an inf. The blocks (`UPDATE_BLOCK`
        elements of one parameter) run on `threads` threads: every rule is element-wise, so the
        result is the same bits on any count.

        Raises:
            TrainingDiverged: a gradient is not finite, or the update made a weight or slot non-finite;
                nothing was changed.
        """
        if not all(np.isfinite(p.grad).all() for p in self.params):
            raise self.diverged("a gradient is not finite")
        self.step_count += 1
        blocks = [(p, a) for p in self.params for a in range(0, p.data.size, UPDATE_BLOCK)]
        workers = max(1, min(self.threads, len(blocks) // BLOCKS_PER_THREAD))
        saved: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(workers)]  # (view, its copy)
        finite = [True] * workers

        def work(w: int) -> None:  # blocks w, w + workers, ...: element-wise, so any split gives the same bits
            with np.errstate(over="ignore", invalid="ignore"):  # detected below, reported as divergence
                for p, a in blocks[w::workers]:
                    scale = self.lr_scales[p.name]
                    block = slice(a, a + UPDATE_BLOCK)
                    data = p.data.reshape(-1)[block]
                    state = {k: v.reshape(-1)[block] for k, v in self.state[p.name].items()}
                    saved[w].extend((view, view.copy()) for view in (data, *state.values()))
                    self.algorithm.update(data, p.grad.reshape(-1)[block], state, self.step_count,
                                          self.lr if scale == 1.0 else self.lr * scale)
                    finite[w] = finite[w] and bool(np.isfinite(data).all()) and all(
                        np.isfinite(v).all() for v in state.values())

        def undo() -> None:
            for view, before in (pair for pairs in saved for pair in pairs):
                view[...] = before
            self.step_count -= 1

        try:
            run_workers(work, workers)
        except BaseException:
            undo()
            raise
        if not all(finite):
            undo()
            raise self.diverged("the update made a weight non-finite")

    def diverged(self, what: str) -> TrainingDiverged:
        """The error for a step refused because of `what`, saying which step and what to try."""
        return TrainingDiverged(f"training diverged at step {self.step_count + 1}: {what}; the step was not "
                                f"applied. Try a lower --lr (now {self.lr:g})")

    def load_state(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Take slot values from `optim/<param>/<slot>` tensors; absent slots stay as they are (zero when fresh).

        Raises:
            ValueError: a slot of another shape than its parameter.
        """
        for p in self.params:
            for s in self.algorithm.slots:
                t = tensors.get(f"optim/{p.name}/{s}")
                if t is not None:
                    if t.shape != p.data.shape:
                        raise ValueError(f"optimizer slot optim/{p.name}/{s} has shape {t.shape}, "
                                         f"parameter {p.data.shape}")
                    if t.any() or np.signbit(t).any():
                        self.state[p.name][s] = np.array(t, dtype=np.float32)
                    else:  # +0.0 everywhere (a fresh model): lazily zeroed pages, no memory until a step writes
                        self.state[p.name][s] = np.zeros_like(p.data)

    def state_tensors(self) -> dict[str, np.ndarray]:
        """Every slot as `optim/<param>/<slot>` tensors (the live arrays), for saving."""
        return {f"optim/{name}/{s}": v for name, slots in self.state.items() for s, v in slots.items()}

    def __repr__(self) -> str:
        return f"Optimizer({self.algorithm!r}, lr={self.lr:g}, step={self.step_count})"


def make_optimizer(config: Mapping[str, Any], params: Sequence[Parameter], step_count: int = 0,
                   param_groups: Sequence[Mapping[str, Any]] | None = None, threads: int = 1) -> Optimizer:
    """The optimizer a model's `meta["optimizer"]` (and `meta["param_groups"]`, if any) describes, over `params`.

    Raises:
        UserError: an unknown optimizer, a missing, unknown or bad setting, or parameter groups that
            are not `[{"name", "params", "lr_scale"}, ...]` covering each parameter at most once.
    """
    return Optimizer(params, Algorithm.from_meta(config), step_count, lr_scales(param_groups or [], params), threads)


def lr_scales(param_groups: Sequence[Mapping[str, Any]], params: Sequence[Parameter]) -> dict[str, float]:
    """`meta["param_groups"]` as a learning-rate factor per parameter name, checked.

    Raises:
        UserError: a group that is not an object with a `params` list and a finite `lr_scale` >= 0, a
            name that is no parameter, or a parameter in two groups.
    """
    names = {p.name for p in params}
    scales: dict[str, float] = {}
    if not isinstance(param_groups, list):
        raise UserError(f"param_groups must be a list, got {param_groups!r:.80}")
    for group in param_groups:
        scale = group.get("lr_scale", 1.0) if isinstance(group, Mapping) else None
        members = group.get("params") if isinstance(group, Mapping) else None
        if not (_is_number(scale) and math.isfinite(scale) and scale >= 0 and isinstance(members, list)):
            raise UserError(f"a parameter group must have a params list and an lr_scale >= 0, got {group!r:.80}")
        for name in members:
            if name not in names:
                raise UserError(f"parameter group {group.get('name')!r} names {name!r}, not a trainable parameter")
            if name in scales:
                raise UserError(f"parameter {name!r} is in two parameter groups")
            scales[name] = float(scale)
    return scales
