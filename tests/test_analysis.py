"""Delta analysis: entries map to the right layer, irrep path and element; tables and overlaps.

The expected tables are built from the e3nn modules of the models themselves (their
``instructions``, irreps and element one-hots), not from ``WeightInfo.describe``, and the
element of an embedding row is checked physically (only that element's isolated-atom energy
moves when the row changes).
"""

from __future__ import annotations

import json
import re
from math import prod

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.data import chemical_symbols

from ase_sparsecalc import SparseCalc, load_backend
from ase_sparsecalc.analysis import compare_deltas, delta_entries, delta_pattern, pattern_tables
from ase_sparsecalc.cli import main
from ase_sparsecalc.delta import DeltaMetadata, SparseDelta, TensorDelta
from ase_sparsecalc.errors import BaseModelError, DeltaShapeError
from ase_sparsecalc.testing import random_sparse_delta

LETTERS = "spdf"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def backends(base_for):
    """One float64 backend per kind, shared by the read-only tests of this module."""
    return {kind: load_backend(base_for(kind), dtype="float64") for kind in ("mace", "sevennet")}


# --------------------------------------------------------------------------- ground truth
def _element_order(backend) -> list[int]:
    model = backend.model
    if backend.name == "mace":
        return [int(z) for z in model.atomic_numbers]
    return [z for z, _ in sorted(model.type_map.items(), key=lambda item: item[1])]


def _blocks(module, linear: bool):
    """(start, path_shape, l_in, l_out) of each weighted instruction of an e3nn module."""
    start, out = 0, []
    irreps_in = module.irreps_in if linear else module.irreps_in1
    for ins in module.instructions:
        if (linear and ins.i_in == -1) or (not linear and not ins.has_weight):
            continue
        l_in = irreps_in[ins.i_in if linear else ins.i_in1].ir.l
        out.append((start, tuple(ins.path_shape), l_in, module.irreps_out[ins.i_out].ir.l))
        start += prod(ins.path_shape)
    return out


def _fill_blocks(coord, blocks, elements, element_axis):
    l_in = np.full(coord.shape, -9)
    l_out = np.full(coord.shape, -9)
    z = np.full(coord.shape, -1)
    for start, shape, li, lo in blocks:
        mask = (coord >= start) & (coord < start + prod(shape))
        l_in[mask], l_out[mask] = li, lo
        if element_axis is not None:
            z[mask] = np.asarray(elements)[np.unravel_index(coord[mask] - start, shape)[element_axis]]
    assert (l_out != -9).all()
    return l_in, l_out, z


def _labels_from_name(backend, name: str) -> tuple[str, str]:
    """(layer label, kind) of a parameter from its name alone."""
    if backend.name == "mace":
        match = re.match(r"^(interactions|products|readouts)\.(\d+)\.", name)
        layer = match.group(2) if match else "embedding"
    else:
        match = re.match(r"^(\d+)_", name)
        layer = match.group(1) if match else ("embedding" if name.startswith("onehot") else "readout")
    if name.startswith(("node_embedding", "onehot")):
        kind = "embedding"
    elif name.startswith(("readouts", "reduce_")):
        kind = "readout"
    elif "skip_tp" in name or "self_connection" in name:
        kind = "self_connection"
    elif "conv_tp_weights" in name or "weight_nn" in name:
        kind = "radial"
    elif ".contractions." in name:
        kind = "symmetric_contraction"
    else:
        kind = "linear"
    return layer, kind


def truth(backend, name: str) -> dict:
    """Layer, kind, l_in, l_out and Z of every flat entry of parameter ``name`` (or "other")."""
    from e3nn import o3

    model = backend.model
    param = dict(model.named_parameters())[name]
    flat = np.arange(param.numel())
    elements = _element_order(backend)
    owner = model.get_submodule(name.rsplit(".", 1)[0])
    contraction = re.match(r"^(.*)\.contractions\.(\d+)\.weights", name)
    radial = re.match(r"^(.*)\.(conv_tp_weights|weight_nn)\.(layer\d+)\.weight$", name)
    if isinstance(owner, o3.Linear):
        axis = 0 if name.startswith(("node_embedding", "onehot")) else None
        l_in, l_out, z = _fill_blocks(flat, _blocks(owner, linear=True), elements, axis)
    elif isinstance(owner, o3.TensorProduct):
        one_hot = owner.irreps_in2.dim == len(elements) and owner.irreps_in2.lmax == 0
        l_in, l_out, z = _fill_blocks(flat, _blocks(owner, False), elements, 1 if one_hot else None)
    elif contraction:
        symmetric = model.get_submodule(contraction.group(1))
        l_out = np.full(flat.shape, symmetric.irreps_out[int(contraction.group(2))].ir.l)
        l_in = np.full(flat.shape, -1)
        z = np.asarray(elements)[np.unravel_index(flat, tuple(param.shape))[0]]
    elif radial:
        parent = model.get_submodule(radial.group(1))
        tp = parent.conv_tp if backend.name == "mace" else parent.convolution
        mlp = parent.get_submodule(radial.group(2))
        last = [n for n, _ in mlp.named_parameters() if n.endswith("weight")][-1]
        if last == f"{radial.group(3)}.weight":
            l_in, l_out, z = _fill_blocks(flat % param.shape[-1], _blocks(tp, False), elements, None)
        else:
            l_in, l_out, z = np.full(flat.shape, -1), np.full(flat.shape, -1), np.full(flat.shape, -1)
    else:
        return {"layer": "other", "kind": "other", "l_in": None, "l_out": None, "Z": None}
    layer, kind = _labels_from_name(backend, name)
    return {"layer": layer, "kind": kind, "l_in": l_in, "l_out": l_out, "Z": z}


def _l(value: int) -> str:
    return "n/a" if value < 0 else LETTERS[value]


def truth_labels(t: dict, dim: str, idx: np.ndarray) -> np.ndarray:
    """Group label of entries ``idx`` under grouping ``dim``, from :func:`truth`."""
    if t["kind"] == "other":
        return np.full(idx.shape, "other", dtype=object)
    if dim in ("layer", "kind"):
        return np.full(idx.shape, t[dim], dtype=object)
    if dim == "l":
        return np.array([_l(v) for v in t["l_out"][idx]], dtype=object)
    if dim == "path":
        pairs = zip(t["l_in"][idx], t["l_out"][idx], strict=True)
        return np.array([("n/a" if lo < 0 else f"{_l(li)}->{_l(lo)}") for li, lo in pairs], dtype=object)
    return np.array([chemical_symbols[z] if z > 0 else "shared" for z in t["Z"][idx]], dtype=object)


def expected_table(backend, delta: SparseDelta, names: list[str], dim: str) -> dict[str, dict]:
    params = {n: p.detach().reshape(-1).double().numpy() for n, p in backend.model.named_parameters()}
    table: dict[str, dict] = {}
    for name in names:
        t = truth(backend, name)
        everything = truth_labels(t, dim, np.arange(params[name].size))
        for label, count in zip(*np.unique(everything, return_counts=True), strict=True):
            row = table.setdefault(label, {"nnz": 0, "total": 0, "sum_d": 0.0, "sum_w": 0.0})
            row["total"] += int(count)
        if name in delta.tensors:
            idx = delta.tensors[name].indices.numpy()
            values = np.abs(delta.tensors[name].values.double().numpy())
            for label, d, w in zip(truth_labels(t, dim, idx), values, np.abs(params[name][idx]), strict=True):
                row = table[label]
                row["nnz"] += 1
                row["sum_d"] += d
                row["sum_w"] += w
    return table


def synthetic_delta(backend, names: list[str], seed: int = 0) -> SparseDelta:
    """Random entries (about 0.5 % plus 3 per tensor) in each of ``names``."""
    rng = np.random.default_rng(seed)
    params = dict(backend.model.named_parameters())
    tensors = {}
    for name in names:
        numel = params[name].numel()
        idx = rng.choice(numel, size=min(numel, 3 + numel // 200), replace=False)
        values = torch.tensor(rng.normal(0.0, 0.1, idx.size), dtype=torch.float64)
        tensors[name] = TensorDelta.create(idx, values, tuple(params[name].shape), name)
    return SparseDelta(tensors, backend.fill_metadata(DeltaMetadata(method="manual")))


# --------------------------------------------------------------------------- tables
@pytest.mark.parametrize("kind", ["mace", "sevennet"])
def test_tables_match_e3nn_instructions(backends, kind):
    backend = backends[kind]
    names = [n for n, _ in backend.model.named_parameters()]
    if kind == "sevennet":  # keep the run short: every kind of tensor, plus an "other" one
        wanted = r"^(onehot|1_|4_|reduce_|rescale_atomic_energy\.shift)"
        names = [n for n in names if re.match(wanted, n)]
    assert any(truth(backend, n)["kind"] == "other" for n in names) == (kind == "sevennet")
    delta = synthetic_delta(backend, names)
    tables = pattern_tables(delta, backend, ["layer", "l", "path", "element", "kind"], trainable=names)
    for dim, rows in tables.items():
        expected = expected_table(backend, delta, names, dim)
        assert {r["group"] for r in rows} == set(expected), dim
        for row in rows:
            exp = expected[row["group"]]
            assert (row["nnz"], row["total"]) == (exp["nnz"], exp["total"]), (dim, row["group"])
            assert row["density"] == pytest.approx(exp["nnz"] / exp["total"], rel=1e-12)
            if exp["nnz"]:
                assert row["mean_abs_delta"] == pytest.approx(exp["sum_d"] / exp["nnz"], rel=1e-12)
                assert row["rel_mean_abs_delta"] == pytest.approx(exp["sum_d"] / exp["sum_w"], rel=1e-12)
            else:
                assert row["mean_abs_delta"] is None
    groups = [r["group"] for r in tables["l"]]
    assert [g for g in groups if g in "spdf"] == sorted((g for g in groups if g in "spdf"), key=LETTERS.index)
    assert {"s", "p", "d"} <= set(groups)
    assert any(g.startswith("n/a->") for g in (r["group"] for r in tables["path"])) == (kind == "mace")


@pytest.mark.parametrize("kind", ["mace", "sevennet"])
def test_linear_paths_match_the_module_behaviour(backends, kind):
    """Switch on one weight alone: the output irrep that moves is l_out, the input it reads l_in."""
    backend = backends[kind].copy()
    name = "interactions.1.linear.weight" if kind == "mace" else "1_self_interaction_2.linear.weight"
    linear = backend.model.get_submodule(name.rsplit(".", 1)[0])
    rng = np.random.default_rng(1)
    idx = np.sort(rng.choice(linear.weight.numel(), size=8, replace=False))
    values = torch.ones(idx.size, dtype=torch.float64)
    delta = SparseDelta({name: TensorDelta.create(idx, values, tuple(linear.weight.shape))})
    entries = delta_entries(delta, backend)
    x = torch.randn(linear.irreps_in.dim, dtype=torch.float64)
    with torch.no_grad():
        for k, entry in zip(idx, entries, strict=True):
            linear.weight.zero_()
            linear.weight.view(-1)[int(k)] = 1.0
            y = linear(x)
            slices = zip(linear.irreps_out, linear.irreps_out.slices(), strict=True)
            moved_out = {mul_ir.ir.l for mul_ir, sl in slices if y[sl].abs().max() > 0}
            read_in = set()
            for mul_ir, sl in zip(linear.irreps_in, linear.irreps_in.slices(), strict=True):
                only = torch.zeros_like(x)
                only[sl] = x[sl]
                if linear(only).abs().max() > 0:
                    read_in.add(mul_ir.ir.l)
            assert entry["index"] == int(k)
            assert {entry["l_out"]} == moved_out and {entry["l_in"]} == read_in
            assert entry["Z"] == -1 and entry["element"] is None and not entry["radial"]


@pytest.mark.parametrize("kind", ["mace", "sevennet"])
def test_embedding_row_maps_to_the_element_whose_energy_moves(backends, kind):
    backend = backends[kind]
    name = "node_embedding.linear.weight" if kind == "mace" else "onehot_to_feature_x.linear.weight"
    shape = tuple(dict(backend.model.named_parameters())[name].shape)
    n_elements = len(backend.atomic_numbers)
    width = prod(shape) // n_elements
    probe = ["H", "C", "O", "Si", "Cu"]
    atoms = [Atoms(s, positions=[[0.0, 0.0, 0.0]]) for s in probe]
    before = [r["energy"] for r in SparseCalc(base=backend).batch_evaluate(atoms, ["energy"])]
    silicon_row = _element_order(backend).index(14)
    other_row = n_elements - 1 if kind == "sevennet" else 0  # an element not probed / hydrogen
    for row in (silicon_row, other_row):
        idx = np.arange(row * width, (row + 1) * width)
        values = torch.full((width,), 0.5, dtype=torch.float64)
        delta = SparseDelta(
            {name: TensorDelta.create(idx, values, shape)}, backend.fill_metadata(DeltaMetadata())
        )
        rows = delta_pattern(delta, backend, by="element")
        changed = [r["group"] for r in rows if r["nnz"]]
        assert len(changed) == 1 and rows[[r["group"] for r in rows].index(changed[0])]["nnz"] == width
        calc = SparseCalc(base=backend, delta=delta)
        after = [r["energy"] for r in calc.batch_evaluate(atoms, ["energy"])]
        moved = [s for s, e0, e1 in zip(probe, before, after, strict=True) if abs(e1 - e0) > 1e-9]
        if changed[0] in probe:
            assert moved == changed
        else:
            assert moved == []


def test_symmetric_contraction_and_radial_entries(backends):
    backend = backends["mace"]
    model = backend.model
    sc = "products.0.symmetric_contractions.contractions.1.weights_max"
    shape = tuple(dict(model.named_parameters())[sc].shape)  # (elements, couplings, channels)
    idx = np.ravel_multi_index(([4, 2], [0, 1], [3, 3]), shape)
    radial = "interactions.1.conv_tp_weights.layer0.weight"
    tensors = {
        sc: TensorDelta.create(idx, torch.tensor([0.1, -0.2]), shape),
        radial: TensorDelta.create([5], torch.tensor([0.3]), (8, 64)),
    }
    entries = delta_entries(SparseDelta(tensors, backend.fill_metadata(DeltaMetadata())), backend)
    by_tensor = {(e["tensor"], e["index"]): e for e in entries}
    l_out = model.products[0].symmetric_contractions.irreps_out[1].ir.l
    for k, element in zip(idx, [model.atomic_numbers[4], model.atomic_numbers[2]], strict=True):
        e = by_tensor[(sc, int(k))]
        assert (e["l_in"], e["l_out"], e["Z"], e["kind"], e["layer"]) == (
            -1,
            l_out,
            element,
            "symmetric_contraction",
            0,
        )
    e = by_tensor[(radial, 5)]
    assert (e["l_in"], e["l_out"], e["Z"], e["radial"], e["layer"]) == (-1, -1, -1, True, 1)


def test_random_delta_groups_add_up(backends, backend_kind):
    backend = backends[backend_kind]
    delta = random_sparse_delta(backend, density=0.01, seed=3)
    tables = pattern_tables(delta, backend, ["layer", "l", "path", "element", "kind", "tensor", "module"])
    for rows in tables.values():
        assert sum(r["nnz"] for r in rows) == delta.nnz
        assert sum(r["total"] for r in rows) == delta.metadata.trainable_numel
        assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert "readout" not in {r["group"] for r in tables["kind"]}
    frame = delta.pattern(backend, by="kind", as_frame=True)
    assert list(frame["group"]) == [r["group"] for r in tables["kind"]]
    assert list(frame["nnz"]) == [r["nnz"] for r in tables["kind"]]


def test_applied_delta_does_not_change_the_base_weights_used(backends):
    backend = backends["mace"].copy()
    delta = random_sparse_delta(backend, density=0.05, seed=4)
    clean = delta_pattern(delta, backend, by="tensor")
    delta.apply(backend)
    try:
        applied = delta_pattern(delta, backend, by="tensor")
    finally:
        delta.remove(backend)
    assert [r["rel_mean_abs_delta"] for r in applied] == [r["rel_mean_abs_delta"] for r in clean]


def test_base_is_loaded_from_metadata_or_refused(backends, mace_model_path):
    backend = backends["mace"]
    delta = random_sparse_delta(backend, density=0.01, seed=5)
    assert delta.metadata.base_model == mace_model_path
    assert delta_pattern(delta, by="l") == delta_pattern(delta, backend, by="l")
    delta.metadata.base_model = ""
    with pytest.raises(BaseModelError, match="names no base model"):
        delta_pattern(delta)
    delta.metadata.base_model = "/nonexistent/model.model"
    with pytest.raises(BaseModelError, match="cannot load the base model"):
        delta_pattern(delta)
    foreign = SparseDelta({"no.such.weight": TensorDelta.create([0], torch.tensor([1.0]), (3,))})
    with pytest.raises(DeltaShapeError, match="not parameters"):
        delta_pattern(foreign, backend)
    with pytest.raises(ValueError, match="group by"):
        delta_pattern(delta, backend, by="irrep")


# --------------------------------------------------------------------------- overlap
def test_compare_deltas_exact_overlaps(backends):
    backend = backends["mace"]
    t1, t2, t3 = "interactions.0.linear.weight", "interactions.1.skip_tp.weight", "products.1.linear.weight"
    shapes = {n: tuple(p.shape) for n, p in backend.model.named_parameters()}

    def make(entries):
        tensors = {n: TensorDelta.create(idx, torch.tensor(vals, dtype=torch.float64), shapes[n])
                   for n, (idx, vals) in entries.items()}  # fmt: skip
        return SparseDelta(tensors, backend.fill_metadata(DeltaMetadata()))

    a = make({t1: (range(10), [1.0] * 10), t2: ([0, 1, 2], [1.0, 1.0, 1.0])})
    b = make({t1: (range(5, 15), [1.0] * 3 + [-1.0] * 7), t3: ([7], [2.0])})
    rows = {r["group"]: r for r in compare_deltas(a, b, backend, by="tensor")}
    assert (rows[t1]["n_a"], rows[t1]["n_b"], rows[t1]["n_both"], rows[t1]["n_either"]) == (10, 10, 5, 15)
    assert rows[t1]["jaccard"] == pytest.approx(5 / 15)
    assert rows[t1]["sign_agreement"] == pytest.approx(3 / 5)
    assert (rows[t2]["n_a"], rows[t2]["n_b"], rows[t2]["n_both"], rows[t2]["jaccard"]) == (3, 0, 0, 0.0)
    assert rows[t2]["sign_agreement"] is None
    assert (rows[t3]["n_a"], rows[t3]["n_b"]) == (0, 1)
    overall = rows["all"]
    assert (overall["n_a"], overall["n_b"], overall["n_both"], overall["n_either"]) == (13, 11, 5, 19)
    by_layer = {r["group"]: r for r in compare_deltas(a, b, backend, by="layer")}
    assert (by_layer["0"]["n_both"], by_layer["1"]["n_a"], by_layer["1"]["n_b"]) == (5, 3, 1)
    self_overlap = compare_deltas(a, a, backend, by="all")
    assert len(self_overlap) == 1 and self_overlap[0]["jaccard"] == 1.0
    seven = random_sparse_delta(backends["sevennet"], density=0.01)
    with pytest.raises(DeltaShapeError, match="different kinds of model \\(mace and sevennet\\)"):
        compare_deltas(a, seven, backend)


# --------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def delta_files(backends, tmp_path_factory):
    folder = tmp_path_factory.mktemp("deltas")
    backend = backends["mace"]
    a = random_sparse_delta(backend, density=0.03, seed=0, energy_shifts={"Si": -0.0125})
    b = random_sparse_delta(backend, density=0.03, seed=1)
    return a.save(folder / "a.safetensors"), b.save(folder / "b.safetensors"), a, b


def test_cli_json(delta_files, capsys):
    path_a, _, a, _ = delta_files
    assert main(["inspect", str(path_a), "--json", "--by", "layer,l,element,kind,path"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["nnz"] == a.nnz and doc["summary"]["energy_shifts_meV"] == {"Si": -12.5}
    assert set(doc["tables"]) == {"layer", "l", "element", "kind", "path"}
    for rows in doc["tables"].values():
        assert sum(r["nnz"] for r in rows) == a.nnz


def test_cli_text_and_plots(delta_files, tmp_path, capsys):
    path_a, _, a, _ = delta_files
    plots = tmp_path / "plots"
    assert main(["inspect", str(path_a), "--plot", str(plots)]) == 0
    out = capsys.readouterr().out
    assert f"non-zeros      {a.nnz:,} of" in out and "Si -12.5 meV/atom" in out
    for title in ("By layer", "By irrep l", "By element", "By module kind"):
        assert title in out
    for letter in "spdf":
        assert re.search(rf"^  {letter} +\d", out, re.MULTILINE), letter
    files = sorted(p.name for p in plots.iterdir())
    assert files == ["layer_element_density.png", "layer_kind_density.png", "layer_l_density.png"]
    assert all((plots / f).read_bytes().startswith(PNG_MAGIC) for f in files)


def test_cli_compare(delta_files, tmp_path, capsys):
    path_a, path_b, a, b = delta_files
    assert main(["inspect", str(path_a), str(path_b), "--json", "--plot", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    both = sum(
        np.intersect1d(a.tensors[n].indices.numpy(), b.tensors[n].indices.numpy()).size
        for n in set(a.tensors) & set(b.tensors)
    )
    assert (doc["overall"]["n_a"], doc["overall"]["n_b"], doc["overall"]["n_both"]) == (a.nnz, b.nnz, both)
    assert (tmp_path / "overlap_layer_l_jaccard.png").read_bytes().startswith(PNG_MAGIC)
    assert main(["inspect", str(path_a), str(path_b)]) == 0
    assert f"|A∩B| = {both:,}" in capsys.readouterr().out
    # the overall grouping prints its one row
    assert main(["inspect", str(path_a), str(path_b), "--by", "all"]) == 0
    assert re.search(rf"^  all +{a.nnz:,} +{b.nnz:,} +{both:,} ", capsys.readouterr().out, re.MULTILINE)


def test_cli_compare_deltas_that_change_no_weight(backends, tmp_path, capsys):
    """Two shift-only deltas: nothing overlaps, and the comparison says so instead of failing."""
    shifts = [SparseDelta({}, random_sparse_delta(backends["mace"], seed=k).metadata) for k in (0, 1)]
    paths = [d.save(tmp_path / f"shift{k}.safetensors") for k, d in enumerate(shifts)]
    assert main(["inspect", *map(str, paths), "--json"]) == 0
    overall = json.loads(capsys.readouterr().out)["overall"]
    assert (overall["n_a"], overall["n_b"], overall["n_either"], overall["jaccard"]) == (0, 0, 0, None)


def test_cli_sevennet_text(backends, tmp_path, capsys):
    delta = random_sparse_delta(backends["sevennet"], density=0.01, seed=2)
    path = delta.save(tmp_path / "7net.safetensors")
    assert main(["inspect", str(path), "--by", "l,element", "--max-rows", "5"]) == 0
    out = capsys.readouterr().out
    assert "sevennet-0 (sevennet" in out
    for letter in "spd":
        assert re.search(rf"^  {letter} +\d", out, re.MULTILINE), letter
    assert "more groups with" in out
    # a shortened table lists the largest changed groups and never a group the delta left alone:
    # without the element embedding, only the shared row has non-zeros
    shared_only = SparseDelta(
        {name: t for name, t in delta.tensors.items() if not name.startswith("onehot_to_feature_x")},
        delta.metadata,
    )
    assert main(["inspect", str(shared_only.save(tmp_path / "shared.safetensors")), "--by", "element",
                 "--max-rows", "5"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    element_table = out.split("By element")[1].split("\n\n")[0].splitlines()[2:]
    rows = [line for line in element_table if not line.strip().startswith("...")]
    assert [line.split()[0] for line in rows] == ["shared"]
    assert all(int(line.split()[1].replace(",", "")) > 0 for line in rows), rows


def test_cli_refuses_delta_without_base(tmp_path, capsys):
    path = SparseDelta({}, DeltaMetadata()).save(tmp_path / "empty.safetensors")
    assert main(["inspect", str(path)]) == 2
    assert "names no base model" in capsys.readouterr().err


def test_trainable_set_follows_the_delta_record(backends):
    backend = backends["mace"]
    params = dict(backend.model.named_parameters())
    readout = sum(p.numel() for n, p in params.items() if n.startswith("readouts"))
    everything = sum(p.numel() for p in params.values())
    name = "interactions.0.linear.weight"
    tensors = {name: TensorDelta.create([1, 2], torch.tensor([0.1, 0.2]), tuple(params[name].shape))}

    def total(**meta):
        delta = SparseDelta(tensors, backend.fill_metadata(DeltaMetadata(**meta)))
        return sum(r["total"] for r in delta_pattern(delta, backend, by="kind"))

    assert total() == everything - readout
    assert total(hyperparameters={"train_readouts": True}) == everything
    assert total(method="full") == everything
    radial = sum(i.numel for i in backend.weight_infos() if i.kind == "radial")
    assert radial > 0
    assert total(hyperparameters={"exclude_kinds": ["radial"]}) == everything - readout - radial
    assert total(hyperparameters={"trainable_tensors": [name]}) == params[name].numel()


# --------------------------------------------------------------------------- other MACE shapes
@pytest.fixture(scope="module")
def nonlinear_agnostic():
    """A MACE model with mace's nonlinear interaction block (a radial MLP of torch.nn.Linear
    layers, element-embedding linears, scalar parameters) and element-agnostic products."""
    from ase_sparsecalc.backends.mace import mace_backend_from_module
    from ase_sparsecalc.testing import build_mace_model

    model = build_mace_model(
        interaction="RealAgnosticResidualNonLinearInteractionBlock", agnostic_product=True, max_ell=2
    )
    return mace_backend_from_module(model, "nonlinear.model", torch.device("cpu"), torch.float64)


def test_radial_mlp_of_torch_linear_layers_maps_rows_to_paths(nonlinear_agnostic):
    """Output row r of the radial MLP is weight r of the tensor product: switching that weight on
    alone moves the output irrep l_out and reads the input irrep l_in that the entry reports."""
    backend = nonlinear_agnostic
    interaction = backend.model.interactions[0]
    mlp, tp = interaction.conv_tp_weights, interaction.conv_tp
    name = "interactions.0.conv_tp_weights.net.9.weight"
    out_layer = dict(backend.model.named_parameters())[name]
    assert out_layer.shape[0] == tp.weight_numel and isinstance(mlp.net[9], torch.nn.Linear)
    rows = np.arange(tp.weight_numel)
    n_in = out_layer.shape[1]
    one_per_row = TensorDelta.create(rows * n_in + 3, torch.ones(rows.size), tuple(out_layer.shape))
    delta = SparseDelta({name: one_per_row})
    entries = delta_entries(delta, backend)
    x1 = torch.randn(1, tp.irreps_in1.dim, dtype=torch.float64)
    x2 = torch.randn(1, tp.irreps_in2.dim, dtype=torch.float64)
    for row, entry in zip(rows, entries, strict=True):
        weights = torch.zeros(1, tp.weight_numel, dtype=torch.float64)
        weights[0, row] = 1.0
        y = tp(x1, x2, weights)[0]
        slices = zip(tp.irreps_out, tp.irreps_out.slices(), strict=True)
        moved = {m.ir.l for m, sl in slices if y[sl].abs().max() > 0}
        read = set()
        for m, sl in zip(tp.irreps_in1, tp.irreps_in1.slices(), strict=True):
            only = torch.zeros_like(x1)
            only[:, sl] = x1[:, sl]
            if tp(only, x2, weights).abs().max() > 0:
                read.add(m.ir.l)
        assert ({entry["l_out"]}, {entry["l_in"]}) == (moved, read) and entry["radial"]


def test_agnostic_products_are_shared_and_edge_embeddings_per_element(nonlinear_agnostic):
    """With use_agnostic_product the symmetric-contraction weights hold one row for all elements
    (counted as shared); the nonlinear block's source/target embeddings read the element one-hot."""
    backend = nonlinear_agnostic
    names = [n for n, _ in backend.model.named_parameters() if ".contractions." in n or "_embedding" in n]
    delta = synthetic_delta(backend, names)
    by_element = {r["group"]: r for r in delta_pattern(delta, backend, by="element", trainable=names)}
    contraction = sum(p.numel() for n, p in backend.model.named_parameters() if ".contractions." in n)
    embeddings = sum(p.numel() for n, p in backend.model.named_parameters() if "_embedding" in n)
    assert by_element["shared"]["total"] == contraction
    per_element = embeddings // len(backend.atomic_numbers)
    assert all(by_element[chemical_symbols[z]]["total"] == per_element for z in backend.atomic_numbers)


def test_inspecting_against_another_base_says_which_weights_were_used(
    mace_model_path, other_mace_model_path, tmp_path, capsys, caplog
):
    """``inspect --base`` with a model of the same shape but other weights: the header names the
    base the delta was made for and the one analysed, and one warning says so in words."""
    delta = random_sparse_delta(load_backend(mace_model_path), density=0.02, seed=3)
    path = delta.save(tmp_path / "d.safetensors")
    with caplog.at_level("WARNING", logger="ase_sparsecalc"):
        assert main(["inspect", str(path), "--base", other_mace_model_path, "--by", "all"]) == 0
    header = capsys.readouterr().out
    assert re.search(r"^base +\S*small_mace\.model", header, re.M)
    assert re.search(r"^analysed with +\S*other_mace\.model .*not the delta's base", header, re.M)
    said = [r.getMessage() for r in caplog.records if "analysed against" in r.getMessage()]
    assert len(said) == 1 and "other_mace.model" in said[0]
    assert main(["inspect", str(path)]) == 0  # against its own base: no such line
    assert "analysed with" not in capsys.readouterr().out


def test_element_heatmap_shows_only_elements_whose_weights_changed(tmp_path):
    """A delta that leaves every element-specific weight alone writes no layer × element plot
    (forty columns of zeros say nothing); one that changes O gets the plot."""
    from ase_sparsecalc.analysis_plots import write_pattern_plots

    def row(layer, dim, label, nnz):
        return {"layer": layer, dim: label, "nnz": nnz, "total": 100, "density": nnz / 100}

    tables = {
        "layer,l": [row("0", "l", "s", 3), row("1", "l", "p", 1)],
        "layer,kind": [row("0", "kind", "linear", 3), row("1", "kind", "self_connection", 1)],
        "layer,element": [row("0", "element", el, 0) for el in ("H", "C", "O")]
        + [row("0", "element", "shared", 4)],
    }
    written = write_pattern_plots(tables, tmp_path / "none")
    assert sorted(p.name for p in written) == ["layer_kind_density.png", "layer_l_density.png"]
    tables["layer,element"][2]["nnz"] = 2
    written = write_pattern_plots(tables, tmp_path / "oxygen")
    assert "layer_element_density.png" in [p.name for p in written]


def test_cli_text_says_how_the_fine_tune_ended(backends, tmp_path, capsys):
    """A delta from a run cut short by max_time says so; one from a finished run gives its
    epochs; a delta that records no run shows no training line."""
    delta = random_sparse_delta(backends["mace"], density=0.03, seed=2)
    runs = {
        "cut": {"epochs": 6, "epochs_run": 1, "stop_reason": "max_time", "training_time_s": 14.8},
        "early": {"epochs": 6, "epochs_run": 4, "stop_reason": "early_stopping", "best_epoch": 3},
    }
    shown = {}
    for name, record in runs.items():
        delta.metadata.hyperparameters = {**(delta.metadata.hyperparameters or {}), **record}
        assert main(["inspect", str(delta.save(tmp_path / f"{name}.safetensors"))]) == 0
        shown[name] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("training ")]
    assert shown["cut"] == [
        "training       1 of 6 epochs (cut short by max_time: its schedules are unfinished), 14.8 s"
    ]
    assert shown["early"][0].startswith("training       4 of 6 epochs (early stopping), best epoch 3")
    bare = random_sparse_delta(backends["mace"], density=0.03, seed=3)
    assert main(["inspect", str(bare.save(tmp_path / "bare.safetensors"))]) == 0
    assert "training " not in capsys.readouterr().out
