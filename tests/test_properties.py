"""Property tests (hypothesis): delta files round-trip, damaged files fail cleanly, deltas apply and
remove exactly, and calculators sharing a base never leak state into each other.

Example counts are modest (25-50) so that the module runs in well under a minute.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.data import chemical_symbols
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ase_sparsecalc import SparseCalc, SparseDelta, TensorDelta, load_backend
from ase_sparsecalc.delta import DeltaMetadata
from ase_sparsecalc.errors import DeltaError, DeltaFileError, DeltaStateError
from ase_sparsecalc.testing import random_sparse_delta

SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}

# these tests stack random deltas on purpose, to check that apply and remove undo each other
pytestmark = pytest.mark.filterwarnings("ignore:delta .* is applied on top of another delta:UserWarning")


def _bits(t: torch.Tensor) -> bytes:
    """The exact bytes of a tensor (so -0.0 and 0.0 differ, as they should for bit-exactness)."""
    return t.detach().cpu().contiguous().numpy().tobytes()


# ---------------------------------------------------------------------------- strategies
tensor_names = st.from_regex(r"[a-z][a-z0-9_]{0,6}(\.[a-z0-9_]{1,6}){0,3}", fullmatch=True)
finite = {"allow_nan": False, "allow_infinity": False}


@st.composite
def tensor_deltas(draw) -> TensorDelta:
    """Any shape (scalars, empty tensors, numel up to ~2**60), any sparse pattern, f32 or f64."""
    shape = tuple(draw(st.lists(st.one_of(st.integers(0, 7), st.integers(1, 2**20)), max_size=3)))
    numel = math.prod(shape)
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    indices = sorted(draw(st.sets(st.integers(0, max(numel - 1, 0)), max_size=min(numel, 40))))
    width = 32 if dtype == torch.float32 else 64
    values = draw(st.lists(st.floats(width=width, **finite), min_size=len(indices), max_size=len(indices)))
    return TensorDelta.create(indices, torch.tensor(values, dtype=dtype), shape)


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.floats(**finite), st.text()
)
metadata = st.builds(
    DeltaMetadata,
    backend=st.sampled_from(["", "mace", "sevennet"]),
    base_model=st.text(),
    base_fingerprint=st.text(alphabet="0123456789abcdef", max_size=64),
    dtype=st.sampled_from(["float32", "float64"]),
    energy_shifts=st.dictionaries(st.sampled_from(chemical_symbols[1:]), st.floats(**finite), max_size=5),
    method=st.text(max_size=10),
    hyperparameters=st.dictionaries(st.text(max_size=8), json_scalars, max_size=4),
    trainable_numel=st.one_of(st.none(), st.integers(0, 2**62)),
)


# ---------------------------------------------------------------------------- delta format
@settings(max_examples=50, **SETTINGS)
@given(tensors=st.dictionaries(tensor_names, tensor_deltas(), max_size=12), meta=metadata)
def test_any_delta_round_trips_bit_exactly(tensors, meta):
    delta = SparseDelta(tensors, meta)
    with tempfile.TemporaryDirectory() as folder:
        loaded = SparseDelta.load(delta.save(Path(folder) / "d.safetensors"))
    assert list(loaded.tensors) == list(delta.tensors)
    for name, tensor in delta.tensors.items():
        other = loaded.tensors[name]
        assert other.shape == tensor.shape
        assert other.values.dtype == tensor.values.dtype
        assert _bits(other.indices) == _bits(tensor.indices)
        assert _bits(other.values) == _bits(tensor.values)
    assert loaded.metadata == delta.metadata
    assert loaded.nnz == delta.nnz


@pytest.fixture(scope="module")
def backend(mace_model_path):
    return load_backend(mace_model_path, dtype="float64")


@pytest.fixture(scope="module")
def delta_file(backend, tmp_path_factory) -> bytes:
    delta = random_sparse_delta(backend, density=0.005, energy_shifts={"O": -0.25})
    return delta.save(tmp_path_factory.mktemp("fuzz") / "d.safetensors").read_bytes()


@settings(max_examples=50, **SETTINGS)
@given(data=st.data())
def test_every_truncation_is_refused_as_a_file_error(delta_file, data):
    cut = data.draw(st.integers(0, len(delta_file) - 1))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cut.safetensors"
        path.write_bytes(delta_file[:cut])
        with pytest.raises(DeltaFileError, match=r"cut\.safetensors"):
            SparseDelta.load(path)


@pytest.mark.filterwarnings("ignore:.*unknown metadata keys:UserWarning")
@settings(max_examples=50, **SETTINGS)
@given(data=st.data())
def test_a_flipped_bit_is_either_harmless_or_a_delta_error(delta_file, backend, data):
    """Damage anywhere (header length, JSON metadata, indices, values) never escapes as a raw error,
    and a delta that still loads either applies and removes exactly or is refused untouched."""
    position = data.draw(st.integers(0, len(delta_file) - 1))
    bit = data.draw(st.integers(0, 7))
    damaged = bytearray(delta_file)
    damaged[position] ^= 1 << bit
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "flip.safetensors"
        path.write_bytes(bytes(damaged))
        try:
            delta = SparseDelta.load(path)
            delta.apply(backend)
        except DeltaError as exc:
            assert str(path) in str(exc)
        else:
            delta.remove(backend)
    for name, tensor in backend.model.state_dict().items():
        assert _bits(tensor) == _bits(before[name]), name
    assert backend.energy_shifts_by_number() == {} and not backend.applied_deltas


# ---------------------------------------------------------------------------- apply / remove
@st.composite
def model_deltas(draw, params: dict[str, torch.Tensor]) -> SparseDelta:
    """A random sparse delta over a real model's parameters: any tensors, any entries, any size."""
    names = draw(st.sets(st.sampled_from(sorted(params)), min_size=1, max_size=6))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    width = 32 if dtype == torch.float32 else 64
    tensors = {}
    for name in names:
        numel = params[name].numel()
        indices = sorted(draw(st.sets(st.integers(0, numel - 1), min_size=1, max_size=min(numel, 25))))
        values = draw(
            st.lists(
                st.floats(-1e6, 1e6, width=width, **finite), min_size=len(indices), max_size=len(indices)
            )
        )
        tensors[name] = TensorDelta.create(
            indices, torch.tensor(values, dtype=dtype), tuple(params[name].shape)
        )
    shifts = draw(
        st.dictionaries(st.sampled_from(["H", "C", "O", "Si", "Cu"]), st.floats(-50, 50), max_size=3)
    )
    return SparseDelta(tensors, DeltaMetadata(energy_shifts=shifts))


@settings(max_examples=30, **SETTINGS)
@given(data=st.data())
def test_apply_then_remove_restores_the_base_bit_exactly(backend, data):
    params = {n: p.detach() for n, p in backend.model.named_parameters()}
    stack = data.draw(st.lists(model_deltas(params), min_size=1, max_size=3))
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}
    applied = []
    for delta in stack:
        previous = {k: v.clone() for k, v in backend.model.state_dict().items()}
        delta.apply(backend)
        applied.append((delta, previous))
        for name, tensor in delta.tensors.items():  # the delta lands exactly where it says
            flat = backend.model.get_parameter(name).detach().view(-1)
            old = previous[name].view(-1)
            expected = old[tensor.indices] + tensor.values.to(old.dtype)
            assert _bits(flat[tensor.indices]) == _bits(expected)
    for delta, previous in reversed(applied):
        delta.remove(backend)
        for name, tensor in backend.model.state_dict().items():
            assert _bits(tensor) == _bits(previous[name]), name
    for name, tensor in backend.model.state_dict().items():
        assert _bits(tensor) == _bits(before[name]), name
    assert backend.energy_shifts_by_number() == {} and not backend.applied_deltas


# ---------------------------------------------------------------------------- shared base
class _Pair:
    """Two calculators built from the same base file, three deltas, and reference predictions."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.calcs = [SparseCalc(base), SparseCalc(base)]
        backend = self.calcs[0].backend
        shifts = [{"H": 0.3}, {"O": -1.0, "C": 0.2}, {}]
        self.deltas = [
            random_sparse_delta(backend, density=0.02, relative_scale=0.3, seed=k, energy_shifts=shifts[k])
            for k in range(3)
        ]
        atoms = molecule("CH3OH")
        atoms.rattle(0.05, seed=1)
        self.atoms = atoms
        self._references: dict[tuple[int, ...], dict] = {}
        self.current: list[int | None] = [None, None]  # delta set with set_delta, per calculator
        self.stacked: list[list[int]] = [[], []]  # deltas applied on top, in order

    def order(self, which: int) -> tuple[int, ...]:
        """The deltas on calculator ``which``, in the order they were applied."""
        base = () if self.current[which] is None else (self.current[which],)
        return base + tuple(self.stacked[which])

    def unstack_all(self, which: int) -> None:
        while self.stacked[which]:
            self.deltas[self.stacked[which].pop()].remove(self.calcs[which].backend)

    def reset(self) -> None:
        """Both calculators back to the bare base (also after an earlier example failed)."""
        for which, calc in enumerate(self.calcs):
            self.unstack_all(which)
            calc.set_delta(None)
            self.current[which] = None

    def reference(self, order: tuple[int, ...]) -> dict:
        """Predictions of a fresh calculator with the deltas ``order`` applied in that order."""
        if order not in self._references:
            fresh = SparseCalc(self.base)
            for k in order:
                self.deltas[k].apply(fresh.backend)
            self._references[order] = fresh.batch_evaluate([self.atoms])[0]
        return self._references[order]

    def predict(self, which: int) -> dict:
        return self.calcs[which].batch_evaluate([self.atoms])[0]


@pytest.fixture(scope="module")
def pair(mace_model_path) -> _Pair:
    return _Pair(mace_model_path)


operations = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.integers(0, 1), st.sampled_from([None, 0, 1, 2])),
        st.tuples(st.just("stack"), st.integers(0, 1), st.integers(0, 2)),
        st.tuples(st.just("unstack"), st.integers(0, 1), st.none()),
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=25, **SETTINGS)
@given(ops=operations)
def test_calculators_sharing_a_base_never_leak_state(pair, ops):
    """``set`` switches a calculator's delta; ``stack`` applies another delta on top of its backend;
    ``unstack`` removes the top one. After every step both calculators predict exactly what a fresh
    calculator with the same deltas (in the same order) predicts."""
    pair.reset()
    for op, which, k in ops:
        calc = pair.calcs[which]
        if op == "set":
            pair.unstack_all(which)
            calc.set_delta(None if k is None else pair.deltas[k])
            pair.current[which] = k
        elif op == "stack":
            if k in pair.order(which):
                with pytest.raises(DeltaStateError, match="already applied"):
                    pair.deltas[k].apply(calc.backend)
            else:
                pair.deltas[k].apply(calc.backend)
                pair.stacked[which].append(k)
        elif pair.stacked[which]:
            pair.deltas[pair.stacked[which].pop()].remove(calc.backend)
        for other in (0, 1):
            got, want = pair.predict(other), pair.reference(pair.order(other))
            assert got["energy"] == want["energy"], (other, pair.order(other))
            assert got["forces"].tobytes() == want["forces"].tobytes(), (other, pair.order(other))
    pair.reset()  # back to the bare base, bit for bit
    for which in (0, 1):
        bare, want = pair.predict(which), pair.reference(())
        assert bare["energy"] == want["energy"]
        assert bare["forces"].tobytes() == want["forces"].tobytes()


def test_reference_predictions_differ_between_deltas(pair):
    """Guard for the test above: the deltas change predictions, so equality means something."""
    energies = [pair.reference(order)["energy"] for order in [(), (0,), (1,), (2,), (0, 1), (1, 0)]]
    assert np.all(np.isfinite(energies))
    assert len(set(energies)) >= 5
