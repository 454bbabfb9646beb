"""Backends: loading, safety of checkpoint loading, named models, path-weight metadata."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ase_sparsecalc import SparseCalc, load_backend
from ase_sparsecalc.backends import foundation_models
from ase_sparsecalc.errors import (
    BaseModelError,
    ChecksumError,
    ConfigError,
    ModelNotFoundError,
    UnsafeCheckpointError,
)
from ase_sparsecalc.testing import save_mace_model


def test_loading_mace_keeps_weights_only_on(mace_model_path):
    load_backend(mace_model_path)
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ


def test_weight_infos_cover_all_parameters(backend64):
    params = dict(backend64.model.named_parameters())
    infos = backend64.weight_infos()
    names = [i.name for i in infos]
    assert len(names) == len(set(names))
    assert set(names) <= set(params)
    covered = sum(i.numel for i in infos)
    assert covered / sum(p.numel() for p in params.values()) > 0.99
    for info in infos:
        assert tuple(params[info.name].shape) == info.shape
        if info.coordinate == "flat":
            assert info.segments[-1].stop == info.numel, info.name
        else:
            assert info.segments[-1].stop == info.shape[-1], info.name


def test_weight_infos_name_paths_and_elements(backend64):
    infos = {i.name: i for i in backend64.weight_infos()}
    kinds = {i.kind for i in infos.values()}
    assert {"embedding", "linear", "radial", "readout"} <= kinds
    embedding = next(i for i in infos.values() if i.kind == "embedding")
    described = embedding.describe(np.arange(embedding.numel))
    assert set(described["Z"]) >= {1, 6, 8, 14}
    ls = set()
    for info in infos.values():
        ls |= set(info.describe(np.arange(info.numel))["l_out"].tolist())
    assert {0, 1, 2} <= ls


def test_malicious_pickle_refused_without_running(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.model"
    torch.save({"model": Exploit()}, path)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_backend(path, backend="mace")
    assert not marker.exists()


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(ModelNotFoundError):
        load_backend(tmp_path / "missing.model")
    with pytest.raises(ModelNotFoundError, match="known model name"):
        load_backend("mace-mp-7-gigantic")


def test_a_delta_names_its_model_file_by_absolute_path(mace_model_path, tmp_path, monkeypatch):
    """A delta made with a relative model path still finds its base from any folder, and when the
    file is gone the error names the delta and says how to give the base."""
    import shutil

    from ase_sparsecalc import SparseCalc
    from ase_sparsecalc.testing import random_sparse_delta

    made_in = tmp_path / "made_in"
    made_in.mkdir()
    shutil.copy(mace_model_path, made_in / "small.model")
    monkeypatch.chdir(made_in)
    delta = random_sparse_delta(load_backend("small.model"))
    assert delta.metadata.base_model == str((made_in / "small.model").resolve())
    delta.save(made_in / "d.safetensors")
    monkeypatch.chdir(tmp_path)
    assert SparseCalc(delta=made_in / "d.safetensors").backend.fingerprint == delta.metadata.base_fingerprint
    (made_in / "small.model").rename(tmp_path / "moved.model")
    message = r"delta .*d\.safetensors: made for the base model '.*small\.model' \(fingerprint \w{12}\).*base"
    with pytest.raises(ModelNotFoundError, match=message):
        SparseCalc(delta=made_in / "d.safetensors")
    assert SparseCalc("moved.model", made_in / "d.safetensors").delta is not None


def test_named_mace_model_offline_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    named = foundation_models.lookup("mace-mp-0-medium")
    assert named.backend == "mace" and named.url.startswith("https://")
    assert named.path.parent == tmp_path / "mace"
    offline = foundation_models.NamedModel(named.name, "mace", "http://127.0.0.1:9/x.model", named.path)
    with pytest.raises(ModelNotFoundError, match=str(named.path)):
        foundation_models.fetch(offline, timeout=2)
    assert not named.path.exists() and not list(tmp_path.glob("mace/*.part"))


def test_mace_omol_is_used_through_its_omol_head(tmp_path, monkeypatch, ethanol):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    named = foundation_models.lookup("MACE-OMOL")
    assert named.name == "mace-omol-0-extra-large" and named.head == "omol"
    assert named.url.startswith("https://") and named.path == tmp_path / "mace" / Path(named.url).name
    # a stand-in file at the cache path (the real one cannot be downloaded here): two heads,
    # neither called "default", so only the named model's default head picks one
    save_mace_model(named.path, atomic_numbers=(1, 6, 8), heads=["pbe", "omol"], charge_and_spin=True)
    by_name = load_backend("mace-omol")
    assert by_name.head == "omol" and by_name.takes_charge_and_spin
    assert load_backend("mace-omol", head="pbe").head == "pbe"
    with pytest.raises(BaseModelError, match="choose a head"):
        load_backend(named.path)
    energies = {
        h: SparseCalc(load_backend(named.path, head=h)).get_potential_energy(ethanol) for h in ("pbe", "omol")
    }
    assert SparseCalc(by_name).get_potential_energy(ethanol) == energies["omol"] != energies["pbe"]


def test_delta_fitted_through_one_head_is_refused_on_another(tmp_path, mace_model_path):
    from ase_sparsecalc.errors import DeltaMismatchError
    from ase_sparsecalc.testing import random_sparse_delta

    path = save_mace_model(tmp_path / "two_heads.model", atomic_numbers=(1, 6, 8), heads=["pbe", "omol"])
    delta = random_sparse_delta(load_backend(path, head="omol"), density=0.05, seed=1)
    assert delta.metadata.head == "omol"
    saved = delta.save(tmp_path / "omol_delta.safetensors")
    with pytest.raises(DeltaMismatchError, match=r"fitted through head 'omol'.*head='omol'"):
        SparseCalc(path, delta=saved, head="pbe")
    assert SparseCalc(path, delta=saved).backend.head == "omol"  # the delta's head by default
    assert random_sparse_delta(load_backend(mace_model_path), seed=2).metadata.head is None


def test_inspect_loads_a_multi_head_base_through_the_deltas_head(tmp_path, capsys):
    """The model has no default head: inspect takes the head from the delta, says so in its
    header, and warns about nothing."""
    import warnings

    from ase_sparsecalc.cli import main
    from ase_sparsecalc.testing import random_sparse_delta

    path = save_mace_model(tmp_path / "two_heads.model", atomic_numbers=(1, 6, 8), heads=["pbe", "omol"])
    delta = random_sparse_delta(load_backend(path, head="omol"), density=0.05, seed=1)
    saved = delta.save(tmp_path / "d.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["inspect", str(saved)]) == 0
        assert main(["inspect", str(saved), "--base", str(path)]) == 0
    assert not [w for w in caught if "head" in str(w.message)]
    out = capsys.readouterr().out
    assert out.count(", head omol)") == 2


def test_finetune_fits_through_the_head_it_is_given(tmp_path, capsys):
    from ase_sparsecalc import SparseDelta
    from ase_sparsecalc.cli import main
    from ase_sparsecalc.errors import ConfigError
    from ase_sparsecalc.finetune import finetune, read_frames

    path = save_mace_model(tmp_path / "two_heads.model", atomic_numbers=(1, 6, 8), heads=["pbe", "omol"])
    train = str(Path(__file__).parents[1] / "examples" / "data" / "ethanol_train.xyz") + "@:6"
    argv = [
        "finetune",
        train,
        "--base",
        str(path),
        "--method",
        "shift",
        "--dtype",
        "float64",
        "--no-progress",
    ]
    assert main([*argv, "-o", str(tmp_path / "none.safetensors")]) == 2  # no default head to fall back on
    assert "choose a head" in capsys.readouterr().err
    deltas = {}
    for head in ("pbe", "omol"):
        output = tmp_path / f"{head}.safetensors"
        assert main([*argv, "--head", head, "-o", str(output)]) == 0
        deltas[head] = SparseDelta.load(output)
        assert deltas[head].metadata.head == head
    # each head's delta brings that head's energies onto the DFT ones (the heads' reference
    # energies differ by 1 eV per atom and more), so calibrated energies agree across heads
    frames = read_frames(train)
    energies = {}
    for head, delta in deltas.items():
        calc = SparseCalc(path, delta=delta)
        assert calc.backend.head == head
        energies[head] = np.array([r["energy"] for r in calc.batch_evaluate([f.atoms for f in frames])])
        bare = SparseCalc(load_backend(path, head=head)).batch_evaluate([f.atoms for f in frames])
        energies[head + " bare"] = np.array([r["energy"] for r in bare])
    assert np.all(np.abs(energies["pbe bare"] - energies["omol bare"]) > 5.0)
    assert np.abs(energies["pbe"] - energies["omol"]).max() < 0.02
    with pytest.raises(ConfigError, match="loaded backend uses 'pbe'"):
        finetune(load_backend(path, head="pbe"), frames, head="omol", method="shift")


def test_head_of_a_loaded_sevennet_backend_is_refused(base_for):
    backend = load_backend(base_for("sevennet"))
    with pytest.raises(ConfigError, match="multi-head MACE models only"):
        load_backend(backend, head="pbe")


def test_named_model_checksum_is_enforced(tmp_path, monkeypatch, mace_model_path):
    cached = tmp_path / "model.model"
    cached.write_bytes(Path(mace_model_path).read_bytes())
    named = foundation_models.NamedModel("mace-mp-0-medium", "mace", "https://example.invalid", cached)
    monkeypatch.setitem(foundation_models.KNOWN_SHA256, "mace-mp-0-medium", "0" * 64)
    with pytest.raises(ChecksumError, match="does not match"):
        foundation_models.fetch(named)
    monkeypatch.delitem(foundation_models.KNOWN_SHA256, "mace-mp-0-medium")
    assert foundation_models.fetch(named) == cached  # first use pins the digest
    cached.write_bytes(cached.read_bytes() + b"tampered")
    with pytest.raises(ChecksumError):
        foundation_models.fetch(named)


def test_bundled_sevennet_checksum():
    pytest.importorskip("sevenn")
    named = foundation_models.lookup("7net-0")
    assert named.name == "sevennet-0"
    assert foundation_models.verify(named) == foundation_models.KNOWN_SHA256["sevennet-0"]


def test_backends_are_independent_copies(mace_model_path):
    a = load_backend(mace_model_path)
    b = load_backend(mace_model_path)
    name, param = next(iter(a.model.named_parameters()))
    with torch.no_grad():
        param.add_(1.0)
    assert not torch.equal(param, dict(b.model.named_parameters())[name])
    assert a.fingerprint == b.fingerprint


def test_forcing_the_wrong_backend_names_the_model_kind(mace_model_path):
    """A MACE file loaded with backend='sevennet' says what the file holds (not a list of
    unsafe globals, which would suggest a security problem)."""
    with pytest.raises(BaseModelError, match=r"backend='sevennet' asked for, but the file holds a MACE"):
        load_backend(mace_model_path, backend="sevennet")


def test_files_that_are_not_whole_potentials_say_what_they_hold(tmp_path):
    """A MACE state dict, a MACE training checkpoint and a dipole model: each refused with what
    it is and which file to give instead, for either backend the loader would pick."""
    from e3nn import o3

    from ase_sparsecalc.testing import build_mace_model
    from ase_sparsecalc.torch_setup import import_keeping_weights_only

    weights = build_mace_model().state_dict()
    torch.save(weights, tmp_path / "weights.pt")
    torch.save({"model": weights, "optimizer": {}, "epoch": 3}, tmp_path / "run_epoch-3.pt")
    for backend in (None, "mace"):
        with pytest.raises(BaseModelError, match=r"weights\.pt: a bare MACE state dict.*torch\.save"):
            load_backend(tmp_path / "weights.pt", backend=backend)
        with pytest.raises(BaseModelError, match=r"run_epoch-3\.pt: a training checkpoint \(keys model"):
            load_backend(tmp_path / "run_epoch-3.pt", backend=backend)
    modules = import_keeping_weights_only("mace.modules")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        dipoles = modules.AtomicDipolesMACE(
            r_max=4.0, num_bessel=6, num_polynomial_cutoff=5, max_ell=1,
            interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
            interaction_cls_first=modules.interaction_classes["RealAgnosticInteractionBlock"],
            num_interactions=2, num_elements=2, hidden_irreps=o3.Irreps("8x0e+8x1o"),
            MLP_irreps=o3.Irreps("8x0e"), avg_num_neighbors=8.0, atomic_numbers=[1, 8], correlation=2,
            gate=torch.nn.functional.silu, atomic_energies=None,
        )  # fmt: skip
    finally:
        torch.set_default_dtype(previous)
    torch.save(dipoles, tmp_path / "dipoles.model")
    with pytest.raises(BaseModelError, match=r"dipoles\.model: the model is an AtomicDipolesMACE"):
        load_backend(tmp_path / "dipoles.model")


def test_clear_cache_forgets_loaded_models(mace_model_path):
    """Loaded files are kept for later calls until clear_cache(); loading again then rereads."""
    from ase_sparsecalc import backends

    first = load_backend(mace_model_path)
    assert any(key[0].endswith("small_mace.model") for key in backends._CACHE)
    backends.clear_cache()
    assert not backends._CACHE
    again = load_backend(mace_model_path)
    assert again.fingerprint == first.fingerprint
