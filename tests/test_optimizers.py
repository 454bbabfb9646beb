"""Optimizers for delta parameters: factored second moments against Adam, state size, resume."""

from __future__ import annotations

import io

import pytest
import torch

from ase_sparsecalc.finetune.optim import FactoredAdam, TensorwiseAdam


def _rank_one_problem(shape, seed=0):
    """A linear loss whose gradient is a fixed outer product, so squared gradients are rank one
    over (rows, columns) and the factored estimate is exact."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape[0], generator=g, dtype=torch.float64) + 0.1
    b = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.1
    signs = torch.randint(0, 2, shape, generator=g).double() * 2 - 1
    return torch.outer(a, b) * signs  # |G| = a b^T: G^2 is rank one


def _run(optimizer_factory, target, steps=25):
    p = torch.nn.Parameter(torch.zeros_like(target))
    opt = optimizer_factory([p])
    for k in range(steps):
        opt.zero_grad()
        ((1 + 0.1 * k) * (p * target).sum()).backward()
        opt.step()
    return p.detach(), opt


def test_without_blocks_it_is_adam():
    target = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours, _ = _run(lambda ps: FactoredAdam(ps, lr=0.01, eps=1e-8), target)
    adam, _ = _run(lambda ps: torch.optim.Adam(ps, lr=0.01, eps=1e-8), target)
    torch.testing.assert_close(ours, adam, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("coordinate", ["flat", "column"])
def test_factored_moments_are_exact_for_rank_one_squared_gradients(coordinate):
    rows, cols = 6, 4
    grad = _rank_one_problem((rows, cols))
    if coordinate == "flat":  # a 1-D tensor whose entries 8: form a 6 x 4 path block
        target = torch.cat([torch.full((8,), 0.3, dtype=torch.float64), grad.reshape(-1)])
        blocks = [("flat", 0, 8, 1, 8), ("flat", 8, 32, rows, cols)]
    else:  # columns 2: of a 6 x 6 tensor form one path, columns :2 another
        target = torch.cat([_rank_one_problem((rows, 2), seed=5), grad], dim=1)
        blocks = [("column", 0, 2, rows, 2), ("column", 2, 6, rows, cols)]

    def factored(ps):
        return FactoredAdam([{"params": ps, "blocks": [blocks]}], lr=0.01, eps=1e-8)

    ours, opt = _run(factored, target)
    adam, _ = _run(lambda ps: torch.optim.Adam(ps, lr=0.01, eps=1e-8), target)
    torch.testing.assert_close(ours, adam, rtol=1e-10, atol=1e-13)
    state = next(iter(opt.state.values()))
    assert state["row_sq"].numel() + state["col_sq"].numel() < target.numel()


def test_factored_moments_keep_channel_differences_that_one_per_tensor_loses():
    """Rows with 100x larger gradients take the same-size Adam step; the estimate must follow."""
    target = torch.ones(4, 3, dtype=torch.float64)
    target[:2] *= 100.0
    blocks = [[("flat", 0, 12, 4, 3)]]
    ours, _ = _run(lambda ps: FactoredAdam([{"params": ps, "blocks": blocks}], lr=0.01, eps=1e-8), target, 5)
    adam, _ = _run(lambda ps: torch.optim.Adam(ps, lr=0.01), target, 5)
    torch.testing.assert_close(ours, adam, rtol=1e-9, atol=1e-12)
    per_tensor, _ = _run(lambda ps: TensorwiseAdam(ps, lr=0.01), target, 5)
    assert not torch.allclose(per_tensor, adam, rtol=0.1)


def test_adafactor_mode_keeps_no_first_moment_and_clips():
    target = _rank_one_problem((8, 8))
    blocks = [[("flat", 0, 64, 8, 8)]]
    p, opt = _run(
        lambda ps: FactoredAdam([{"params": ps, "blocks": blocks}], lr=0.01, betas=(0.0, 0.999)), target, 3
    )
    state = next(iter(opt.state.values()))
    assert "exp_avg" not in state
    assert sum(t.numel() for t in state.values() if torch.is_tensor(t)) == 16
    # every step moves each entry against its gradient by at most lr x clip (RMS-clipped)
    assert (p * target < 0).all()
    assert p.square().mean().sqrt() <= 3 * 0.01 * (1 + 1e-12)  # each step's RMS <= lr * clip


def test_state_survives_a_weights_only_checkpoint():
    target = _rank_one_problem((5, 3), seed=2)
    blocks = [[("flat", 0, 15, 5, 3)]]

    def make(ps):
        return FactoredAdam([{"params": ps, "blocks": blocks}], lr=0.01, weight_decay=0.1)

    straight, _ = _run(make, target, steps=10)

    p, opt = _run(make, target, steps=4)
    buffer = io.BytesIO()
    torch.save({"p": p, "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    q = torch.nn.Parameter(saved["p"].clone())
    resumed = make([q])
    resumed.load_state_dict(saved["opt"])
    for k in range(4, 10):
        resumed.zero_grad()
        ((1 + 0.1 * k) * (q * target).sum()).backward()
        resumed.step()
    torch.testing.assert_close(q.detach(), straight, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_path_without_gradient_stays_put(dtype):
    """A path no structure in the data uses (e.g. an absent element) gets zero gradients."""
    p = torch.nn.Parameter(torch.ones(24, dtype=dtype))
    blocks = [[("flat", 0, 12, 3, 4), ("flat", 12, 24, 3, 4)]]
    opt = FactoredAdam([{"params": [p], "blocks": blocks}], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        (p[:12] ** 2).sum().backward()
        opt.step()
    assert torch.isfinite(p).all()
    assert torch.equal(p[12:].detach(), torch.ones(12, dtype=dtype))
    assert (p[:12] < 1).all()
