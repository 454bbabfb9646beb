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

    def __init__(
        self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-12, weight_decay: float = 0.0
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient; returns the closure's loss, if any."""
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


Block = tuple[str, int, int, int, int]
"""A matrix block of a tensor: ``(coordinate, start, stop, rows, cols)``; ``coordinate`` is
``"flat"`` (entries ``start:stop`` of the flattened tensor, read as ``rows x cols``) or
``"column"`` (columns ``start:stop`` of the tensor read as ``rows x n_columns``)."""


class FactoredAdam(torch.optim.Optimizer):
    r"""Adam whose second moments are factored over matrix blocks (Adafactor's estimator).

    For every block :math:`G` (``rows x cols``, one irrep path of a weight tensor) the optimizer
    keeps running means of :math:`G^2` over rows, :math:`r`, and over columns, :math:`c`, and
    uses the rank-one estimate :math:`\hat V = r c^\top / \bar r` in place of per-entry second
    moments (Shazeer and Stern, 2018). Unlike one estimate per tensor, this keeps the
    differences between input and output channels of a path, at a cost of ``rows + cols``
    numbers per block instead of ``rows * cols``. With ``betas[0] = 0`` no first moment is kept
    either and each block's update is clipped to RMS ``clip`` (Adafactor's update clipping):
    the optimizer state is then a few per cent of the parameters.

    Each parameter group may carry ``"blocks"``: one list of :data:`Block` per parameter that
    covers every entry exactly once (see :func:`~.methods.moment_blocks`); None is one
    ``1 x numel`` block, i.e. per-entry second moments as in Adam.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-12,
        weight_decay: float = 0.0,
        clip: float = 1.0,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "clip": clip,
            "blocks": None,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient; returns the closure's loss, if any."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            blocks = group["blocks"] or [None] * len(group["params"])
            for p, layout in zip(group["params"], blocks, strict=True):
                if p.grad is not None:
                    self._update(p, complete_blocks(layout, p.shape), group)
        return loss

    def _update(self, p: torch.Tensor, layout: list[Block], group: dict) -> None:
        beta1, beta2 = group["betas"]
        state = self.state[p]
        if not state:
            state["step"] = 0
            if beta1 > 0:
                state["exp_avg"] = torch.zeros_like(p)
            state["row_sq"] = p.new_zeros(sum(rows for *_, rows, _ in layout))
            state["col_sq"] = p.new_zeros(sum(cols for *_, cols in layout))
        state["step"] += 1
        grad = p.grad.contiguous()
        if beta1 > 0:
            state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
            direction = state["exp_avg"] / (1 - beta1 ** state["step"])
        else:
            direction = grad
        bias2 = 1 - beta2 ** state["step"]
        update = torch.empty_like(p)
        row_at = col_at = 0
        for block in layout:
            rows, cols = block[3], block[4]
            g2 = _block(grad, block).square()
            row_sq = state["row_sq"][row_at : row_at + rows]
            col_sq = state["col_sq"][col_at : col_at + cols]
            row_sq.mul_(beta2).add_(g2.mean(dim=1), alpha=1 - beta2)
            col_sq.mul_(beta2).add_(g2.mean(dim=0), alpha=1 - beta2)
            row_at, col_at = row_at + rows, col_at + cols
            v_hat = torch.outer(row_sq, col_sq) / (row_sq.mean() * bias2).clamp_min(torch.finfo(p.dtype).tiny)
            step = _block(direction, block) / (v_hat.sqrt() + group["eps"])
            if beta1 == 0:
                step = step / (step.square().mean().sqrt() / group["clip"]).clamp_min(1.0)
            _block(update, block).copy_(step)
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update, alpha=-group["lr"])


def complete_blocks(layout: list[Block] | None, shape: torch.Size) -> list[Block]:
    """``layout``, or one ``1 x numel`` block (per-entry moments) when there is none."""
    if not layout:
        numel = int(torch.Size(shape).numel())
        return [("flat", 0, numel, 1, numel)]
    return [tuple(b) for b in layout]


def _block(t: torch.Tensor, block: Block) -> torch.Tensor:
    """The ``rows x cols`` view of ``t`` that ``block`` names (writes go through to ``t``)."""
    coordinate, start, stop, rows, cols = block
    if coordinate == "column":
        return t.view(rows, -1)[:, start:stop]
    return t.view(-1)[start:stop].view(rows, cols)
