"""Optimizers for delta parameters."""

from __future__ import annotations

import torch


class TensorwiseAdam(torch.optim.Optimizer):
    r"""Adam with one second-moment estimate per tensor instead of per entry (decoupled decay).

    Per-entry Adam moves every entry with a consistent gradient by about the learning rate per
    step, however small that gradient is; a sparse method that picks the largest entries would
    then pick by sign consistency, not by importance. Normalising by the tensor's mean squared
    gradient keeps the relative size of the entries' gradients within a tensor, while each
    tensor still gets a scale-free step.

    .. math:: m \leftarrow \beta_1 m + (1-\beta_1) g,\quad
              v \leftarrow \beta_2 v + (1-\beta_2)\,\overline{g^2},\quad
              p \leftarrow p(1 - \eta\lambda) - \eta\,\hat m / (\sqrt{\hat v} + \epsilon)
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-12,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros((), dtype=p.dtype, device=p.device)
                state["step"] += 1
                grad = p.grad
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).add_(grad.pow(2).mean(), alpha=1 - beta2)
                bias1 = 1 - beta1 ** state["step"]
                bias2 = 1 - beta2 ** state["step"]
                denom = (state["exp_avg_sq"] / bias2).sqrt() + group["eps"]
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(state["exp_avg"] / denom, alpha=-group["lr"] / bias1)
        return loss
