"""Server optimizers: how the aggregator turns the average update into the next model.

FedAvg applies the mean update with a server learning rate; FedAdam (Reddi et al.
2021, "Adaptive Federated Optimization") treats the negative mean update as a
pseudo-gradient. Both work on flat float32 vectors and keep their state as arrays
so the aggregator can checkpoint them.
"""

from __future__ import annotations

import numpy as np

from .fedsgd import FedSGDServer, server_round, site_privacy


class ServerOptimizer:
    name = "base"

    def step(self, weights: np.ndarray, mean_update: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        return None


class FedAvg(ServerOptimizer):
    name = "fedavg"

    def __init__(self, lr: float = 1.0) -> None:
        self.lr = lr

    def step(self, weights: np.ndarray, mean_update: np.ndarray) -> np.ndarray:
        return (weights + self.lr * mean_update).astype(np.float32)


class FedAdam(ServerOptimizer):
    name = "fedadam"

    def __init__(self, lr: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        self.lr, self.beta1, self.beta2, self.tau = lr, beta1, beta2, tau
        self.m: np.ndarray | None = None
        self.v: np.ndarray | None = None

    def step(self, weights: np.ndarray, mean_update: np.ndarray) -> np.ndarray:
        delta = mean_update.astype(np.float64)
        if self.m is None or self.v is None:
            self.m = np.zeros_like(delta)
            self.v = np.full_like(delta, self.tau**2)
        self.m = self.beta1 * self.m + (1 - self.beta1) * delta
        self.v = self.beta2 * self.v + (1 - self.beta2) * delta**2
        return (weights + self.lr * self.m / (np.sqrt(self.v) + self.tau)).astype(np.float32)

    def state(self) -> dict[str, np.ndarray]:
        return {} if self.m is None or self.v is None else {"m": self.m, "v": self.v}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        if state:
            self.m, self.v = state["m"].astype(np.float64), state["v"].astype(np.float64)


def make_server_optimizer(name: str, lr: float) -> ServerOptimizer:
    if name == "fedavg":
        return FedAvg(lr)
    if name == "fedadam":
        return FedAdam(lr)
    raise ValueError(f"unknown server optimizer {name!r}")


class FedSGDStep(ServerOptimizer):
    """DP-FedSGD's server step (`core.fedsgd`): decode the unmasked ring sum of the sites' clipped, noised
    gradient sums, divide by the plan's expected batch and take one SGD-with-momentum step. It needs the
    ring sum, not a mean update: use `step_ring`."""

    def __init__(self, plan, dim: int) -> None:
        self.privacy = site_privacy(plan, plan.secagg_config(dim))
        self.server = FedSGDServer(plan.server_lr, plan.momentum, plan.ema, plan.center_rounds_used)

    def step(self, weights: np.ndarray, mean_update: np.ndarray) -> np.ndarray:
        raise TypeError("DP-FedSGD steps on the ring sum: call step_ring")

    def step_ring(self, weights: np.ndarray, ring_sum: np.ndarray) -> np.ndarray:
        new, _extras = server_round(self.server, self.privacy, weights, ring_sum)
        return new

    def state(self) -> dict[str, np.ndarray]:
        return self.server.state()

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.server.load_state(state)


def make_plan_optimizer(plan, dim: int) -> ServerOptimizer:
    """The server optimizer a plan asks for (`dim`: the model's parameter count)."""
    if plan.algorithm == "fedsgd":
        return FedSGDStep(plan, dim)
    return make_server_optimizer(plan.server_optimizer, plan.server_lr)
