"""Delta files: bit-exact round trips and clear refusals of bad files."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from ase_sparsecalc import SparseDelta
from ase_sparsecalc.delta_io import METADATA_KEY
from ase_sparsecalc.errors import DeltaFileError, DeltaFormatError, DeltaValueError
from ase_sparsecalc.testing import random_sparse_delta


@pytest.fixture
def delta(backend64):
    return random_sparse_delta(backend64, density=0.02, energy_shifts={"Si": -0.3, "H": 0.01})


def test_round_trip_is_bit_exact(delta, tmp_path):
    path = delta.save(tmp_path / "d.safetensors")
    loaded = SparseDelta.load(path)
    assert list(loaded.tensors) == list(delta.tensors)
    for name, t in delta.tensors.items():
        assert torch.equal(loaded.tensors[name].indices, t.indices)
        assert torch.equal(loaded.tensors[name].values, t.values)
        assert loaded.tensors[name].values.dtype == t.values.dtype
        assert loaded.tensors[name].shape == t.shape
    assert loaded.metadata == delta.metadata
    assert not list(tmp_path.glob(".*tmp")), "temporary file left behind"


def test_float64_values_round_trip(delta, tmp_path):
    for name, t in list(delta.tensors.items()):
        delta.tensors[name] = type(t)(t.indices, t.values.double() / 3, t.shape)
    loaded = SparseDelta.load(delta.save(tmp_path / "d64.safetensors"))
    for name, t in delta.tensors.items():
        assert torch.equal(loaded.tensors[name].values, t.values)


def test_missing_file(tmp_path):
    with pytest.raises(DeltaFileError, match="not found"):
        SparseDelta.load(tmp_path / "nope.safetensors")


def test_truncated_file(delta, tmp_path):
    path = delta.save(tmp_path / "d.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DeltaFileError, match=r"d\.safetensors"):
        SparseDelta.load(path)


def test_pickle_renamed_as_delta_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(DeltaFileError):
        SparseDelta.load(path)
    assert not marker.exists()


def _rewrite_header(path, edit):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(meta, tensors)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})


def test_unknown_format_version(delta, tmp_path):
    path = delta.save(tmp_path / "d.safetensors")
    _rewrite_header(path, lambda meta, t: meta.update(format_version=99))
    with pytest.raises(DeltaFormatError, match="version 99"):
        SparseDelta.load(path)


def test_nan_in_file_is_refused(delta, tmp_path):
    path = delta.save(tmp_path / "d.safetensors")

    def poison(meta, tensors):
        key = next(k for k in tensors if k.endswith("::values"))
        tensors[key][0] = float("nan")

    _rewrite_header(path, poison)
    with pytest.raises(DeltaValueError, match="NaN"):
        SparseDelta.load(path)


def test_plain_safetensors_without_metadata(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(3)}, str(path))
    with pytest.raises(DeltaFormatError, match="metadata"):
        SparseDelta.load(path)


def test_unknown_metadata_keys_are_kept_with_warning(delta, tmp_path):
    path = delta.save(tmp_path / "d.safetensors")
    _rewrite_header(path, lambda meta, t: meta.update(future_key=1))
    with pytest.warns(UserWarning, match="future_key"):
        loaded = SparseDelta.load(path)
    assert loaded.metadata.extra == {"future_key": 1}
