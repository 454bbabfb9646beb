"""SparseDelta: validation, apply/remove exactness, construction from models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ase_sparsecalc import SparseDelta, TensorDelta, load_backend
from ase_sparsecalc.errors import DeltaMismatchError, DeltaShapeError, DeltaStateError, DeltaValueError
from ase_sparsecalc.testing import random_sparse_delta


def test_tensor_delta_sorts_and_validates():
    t = TensorDelta.create([5, 1, 3], [0.5, 0.1, 0.3], (2, 3))
    assert t.indices.tolist() == [1, 3, 5]
    assert t.values.tolist() == pytest.approx([0.1, 0.3, 0.5])
    assert t.to_dense().shape == (2, 3)
    assert t.to_dense()[1, 2] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("indices", "values", "error"),
    [
        ([0, 6], [1.0, 1.0], DeltaShapeError),  # out of range for 6 entries
        ([-1], [1.0], DeltaShapeError),
        ([1, 1], [1.0, 2.0], DeltaShapeError),  # repeated
        ([1, 2], [1.0], DeltaShapeError),  # length mismatch
        ([1], [float("nan")], DeltaValueError),
        ([1], [float("inf")], DeltaValueError),
    ],
)
def test_tensor_delta_rejects_bad_entries(indices, values, error):
    with pytest.raises(error):
        TensorDelta.create(indices, values, (2, 3), "w")


def test_apply_remove_is_bit_exact(backend64):
    before = {k: v.clone() for k, v in backend64.model.state_dict().items()}
    delta = random_sparse_delta(backend64, density=0.05, energy_shifts={"H": 0.1})
    delta.apply(backend64)
    changed = [k for k, v in backend64.model.state_dict().items() if not torch.equal(v, before[k])]
    assert set(changed) == set(delta.tensors)
    assert backend64.energy_shifts_by_number() == {1: pytest.approx(0.1)}
    delta.remove(backend64)
    for k, v in backend64.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert backend64.energy_shifts_by_number() == {}


def test_apply_twice_and_remove_unapplied_fail(backend64):
    delta = random_sparse_delta(backend64, density=0.01)
    with pytest.raises(DeltaStateError):
        delta.remove(backend64)
    delta.apply(backend64)
    with pytest.raises(DeltaStateError):
        delta.apply(backend64)


def test_stacked_deltas_remove_in_reverse_order(backend64):
    before = {k: v.clone() for k, v in backend64.model.state_dict().items()}
    a = random_sparse_delta(backend64, density=0.05, seed=1, energy_shifts={"Si": -0.3})
    b = random_sparse_delta(backend64, density=0.05, seed=2, energy_shifts={"Si": -0.2})
    a.apply(backend64)
    with pytest.warns(UserWarning, match="on top of another delta: their weight changes and their energy"):
        b.apply(backend64)
    assert backend64.energy_shifts_by_number()[14] == pytest.approx(-0.5)
    with pytest.raises(DeltaStateError):
        a.remove(backend64)
    b.remove(backend64)
    a.remove(backend64)
    for k, v in backend64.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_from_models_recovers_a_known_change(backend64):
    tuned = backend64.copy()
    name = next(iter(dict(tuned.model.named_parameters())))
    with torch.no_grad():
        param = dict(tuned.model.named_parameters())[name]
        param.view(-1)[[0, 3]] += torch.tensor([0.5, -0.25], dtype=param.dtype)
    delta = SparseDelta.from_models(backend64, tuned)
    assert list(delta.tensors) == [name]
    assert delta.tensors[name].indices.tolist() == [0, 3]
    assert delta.tensors[name].values.numpy() == pytest.approx([0.5, -0.25])
    assert delta.metadata.base_fingerprint == backend64.fingerprint
    assert delta.nnz == 2
    assert delta.density == pytest.approx(2 / sum(p.numel() for p in backend64.model.parameters()))


def test_delta_for_other_model_is_refused(backend64, other_mace_model_path, base_for):
    other = load_backend(other_mace_model_path, dtype="float64")
    delta = random_sparse_delta(other, density=0.01)
    if backend64.name != "mace":
        with pytest.raises(DeltaMismatchError, match="mace"):
            delta.apply(backend64)
        return
    with pytest.raises(DeltaMismatchError, match="other_mace"):
        delta.apply(backend64)
    with pytest.warns(UserWarning, match="strict=False"):
        delta.apply(backend64, strict=False)


def test_shape_mismatch_is_refused(backend64):
    name, param = next(iter(backend64.model.named_parameters()))
    bad = SparseDelta({name: TensorDelta.create([0], [1.0], (param.numel() + 1,), name)})
    with pytest.raises(DeltaShapeError, match="shape"):
        bad.apply(backend64)
    unknown = SparseDelta({"no.such.weight": TensorDelta.create([0], [1.0], (3,))})
    with pytest.raises(DeltaShapeError, match="not a parameter"):
        unknown.apply(backend64)


def test_density_uses_trainable_numel(backend64):
    delta = random_sparse_delta(backend64, density=0.03)
    assert delta.density == pytest.approx(0.03, rel=0.05)
    assert np.isclose(delta.nnz / delta.metadata.trainable_numel, delta.density)


def test_applied_block_removes_the_delta_also_on_an_error(backend64):
    """``with delta.applied(backend):`` merges the delta for the block and restores the base
    weights bit for bit on leaving, whether the block ends normally or raises."""
    before = {k: v.clone() for k, v in backend64.model.state_dict().items()}
    delta = random_sparse_delta(backend64, density=0.02, seed=4)
    with delta.applied(backend64):
        assert delta.is_applied(backend64)
        assert any(not torch.equal(v, backend64.model.state_dict()[k]) for k, v in before.items())
    assert not delta.is_applied(backend64)
    with pytest.raises(KeyError), delta.applied(backend64):
        raise KeyError("inside the block")
    assert not delta.is_applied(backend64)
    for k, v in backend64.model.state_dict().items():
        assert torch.equal(v, before[k]), k
