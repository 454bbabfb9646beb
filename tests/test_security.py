"""Untrusted files: pickles are refused before anything in them runs; downloads are checked.

Complements ``test_delta_io.py`` (a pickle renamed as a delta) and ``test_backends.py`` (a
pickle loaded as a MACE model, checksum pinning of a cached file).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from typing import ClassVar

import pytest
import torch

from ase_sparsecalc import load_backend
from ase_sparsecalc.backends import foundation_models
from ase_sparsecalc.backends.safe_load import SEVENNET_ALLOWED, load_checkpoint
from ase_sparsecalc.errors import (
    BaseModelError,
    CheckpointError,
    ChecksumError,
    ModelNotFoundError,
    UnsafeCheckpointError,
)


class _Exploit:
    """Unpickling this object would create ``marker``; nothing may ever unpickle it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("backend", ["sevennet", "mace", None])
def test_malicious_checkpoint_refused_for_every_backend(tmp_path, backend):
    pytest.importorskip("sevenn")
    marker = tmp_path / "ran"
    path = tmp_path / "checkpoint.pth"
    # shaped like a SevenNet checkpoint, with the payload hidden inside the config
    torch.save({"model_state_dict": {}, "config": {"cutoff": _Exploit(marker)}}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"os\.system|posix\.system") as info:
        load_backend(path, backend=backend)
    assert str(path) in str(info.value)
    assert not marker.exists()


class _FunctionOnTheAllowList:
    """A payload calling a *function* of a package whose classes MACE files need: numpy's test
    helper ``runstring`` runs a string of Python, as an e3nn or mace function might."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        from numpy.testing._private.utils import runstring

        return (runstring, (f"import pathlib; pathlib.Path({self.marker!r}).touch()", {}))


def test_mace_allow_list_admits_classes_not_any_function_of_a_package(mace_model_path, tmp_path):
    """Beside a genuine MACE model, a numpy function that executes code is refused before loading;
    the genuine model alone loads."""
    from ase_sparsecalc.backends.safe_load import MACE_ALLOWED

    marker = tmp_path / "ran"
    model = load_checkpoint(mace_model_path, MACE_ALLOWED)
    path = tmp_path / "numpy_exec.model"
    torch.save({"model": model, "payload": _FunctionOnTheAllowList(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"numpy\.testing\._private\.utils\.runstring"):
        load_backend(path, backend="mace")
    assert not marker.exists()


def test_sevennet_allow_list_admits_numpy_arrays_only(tmp_path):
    """A checkpoint holding a torch module (fine for MACE files) is refused on the SevenNet path."""
    path = tmp_path / "module.pth"
    torch.save({"model_state_dict": {}, "config": torch.nn.Linear(2, 2)}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.nn\.modules\.linear\.Linear"):
        load_checkpoint(path, SEVENNET_ALLOWED)
    with pytest.raises(UnsafeCheckpointError):
        load_backend(path, backend="sevennet")


@pytest.mark.parametrize("backend", ["sevennet", "mace"])
def test_plain_and_legacy_pickles_are_refused_unread(tmp_path, backend):
    """Not torch's zip format: refused without unpickling (``torch.load`` never sees them)."""
    pytest.importorskip("sevenn")
    marker = tmp_path / "ran"
    plain = tmp_path / "plain.model"
    plain.write_bytes(pickle.dumps({"model": _Exploit(marker)}))
    legacy = tmp_path / "legacy.model"
    torch.save({"model": _Exploit(marker)}, legacy, _use_new_zipfile_serialization=False)
    for path in (plain, legacy):
        with pytest.raises(BaseModelError, match=re.escape(str(path))):
            load_backend(path, backend=backend)
    assert not marker.exists()


def test_malicious_training_checkpoint_is_refused_on_resume(mace_model_path, tmp_path):
    from ase.build import molecule
    from ase.calculators.singlepoint import SinglePointCalculator

    from ase_sparsecalc.finetune import finetune

    frames = []
    for k in range(3):
        atoms = molecule("H2O")
        atoms.rattle(0.02, seed=k)
        atoms.calc = SinglePointCalculator(atoms, energy=-14.0 - k, forces=atoms.positions * 0.01)
        frames.append(atoms)
    marker = tmp_path / "ran"
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    torch.save({"fingerprint": "x", "state": _Exploit(marker)}, checkpoints / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt: cannot read checkpoint") as info:
        finetune(
            mace_model_path, frames, checkpoint_dir=checkpoints, resume=True, epochs=1, valid_fraction=0.0
        )
    assert not marker.exists()
    # the reason is torch's unpickler line, not its advice to load the file with weights_only off
    assert "system" in str(info.value) and "weights_only" not in str(info.value)


# ---------------------------------------------------------------------------- named models
def test_known_digests_belong_to_named_models():
    names = set(foundation_models.named_models())
    for name, digest in foundation_models.KNOWN_SHA256.items():
        assert name in names, name
        assert re.fullmatch(r"[0-9a-f]{64}", digest), name
    # every MACE foundation model with a recorded digest resolves to a download address
    for name in ("mace-mp-0-small", "mace-mp-0-large", "mace-mpa-0-medium", "mace-off23-large"):
        assert name in foundation_models.KNOWN_SHA256


class _FakeResponse(io.BytesIO):
    headers: ClassVar[dict[str, str]] = {"Content-Type": "application/octet-stream"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _serve(monkeypatch, payload: bytes) -> None:
    monkeypatch.setattr(
        foundation_models.urllib.request, "urlopen", lambda url, timeout: _FakeResponse(payload)
    )


def test_download_with_wrong_digest_never_enters_the_cache(tmp_path, monkeypatch):
    cached = tmp_path / "mace" / "MACE-OFF23_small.model"
    named = foundation_models.NamedModel("mace-off23-small", "mace", "https://example.invalid/m", cached)
    _serve(monkeypatch, b"a substituted file")
    with pytest.raises(ChecksumError, match="does not match the expected 165cce4c"):
        foundation_models.fetch(named)
    assert not cached.exists()
    assert list(cached.parent.iterdir()) == [], "partial download left behind"


def test_download_with_known_digest_is_cached(tmp_path, monkeypatch):
    payload = b"the published bytes"
    cached = tmp_path / "mace" / "model.model"
    named = foundation_models.NamedModel("mace-mp-0-large", "mace", "https://example.invalid/m", cached)
    monkeypatch.setitem(
        foundation_models.KNOWN_SHA256, "mace-mp-0-large", hashlib.sha256(payload).hexdigest()
    )
    _serve(monkeypatch, payload)
    assert foundation_models.fetch(named) == cached
    assert cached.read_bytes() == payload
    assert sorted(p.name for p in cached.parent.iterdir()) == ["model.model"]


def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch):
    class Broken(_FakeResponse):
        def read(self, size=-1):
            raise ConnectionResetError("connection reset by peer")

    cached = tmp_path / "mace" / "model.model"
    named = foundation_models.NamedModel("mace-mp-0-medium", "mace", "https://example.invalid/m", cached)
    monkeypatch.setattr(foundation_models.urllib.request, "urlopen", lambda url, timeout: Broken(b""))
    with pytest.raises(ModelNotFoundError, match=re.escape("download from https://example.invalid/m failed")):
        foundation_models.fetch(named)
    assert list(cached.parent.iterdir()) == []


def test_old_pickle_trajectory_is_refused_unread(tmp_path):
    """ASE's pre-2015 trajectory format was a pickle; neither reader of this package unpickles it."""
    from ase_sparsecalc.errors import DataFileError
    from ase_sparsecalc.finetune import read_frames
    from ase_sparsecalc.structure_io import read_structure

    marker = tmp_path / "ran"
    path = tmp_path / "old.traj"
    path.write_bytes(b"PickleTrajectory" + pickle.dumps({"atoms": _Exploit(marker)}, protocol=2))
    for read in (read_frames, read_structure):
        with pytest.raises(DataFileError, match=r"old\.traj"):
            read(path)
    assert not marker.exists()
