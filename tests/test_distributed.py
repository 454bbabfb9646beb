"""Data-parallel fine-tuning: shard losses add up to the batch loss; torchrun gives the same delta."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ase_sparsecalc import SparseDelta, load_backend
from ase_sparsecalc.finetune import read_frames
from ase_sparsecalc.finetune.batches import LossWeights, batch_loss, make_batches
from ase_sparsecalc.finetune.distributed import ProcessInfo, shard

ROOT = Path(__file__).parents[1]
ETHANOL = ROOT / "examples" / "data" / "ethanol_train.xyz"
SILICON = ROOT / "tests" / "data" / "gpaw_si_md.txt"  # PBEsol GPAW MD of 8-atom Si, with stress


@pytest.fixture(scope="module")
def mixed_frames():
    """Real DFT frames of two kinds: ethanol (9 atoms, no stress) and bulk Si (8 atoms, stress)."""
    return read_frames(f"{ETHANOL}@:6") + read_frames(str(SILICON))


def test_shard_takes_every_nth_frame():
    ids = [7, 3, 9, 1, 4]
    parts = [shard(ids, ProcessInfo(rank, 2)) for rank in range(2)]
    assert parts == [[7, 9, 4], [3, 1]]
    assert shard([5], ProcessInfo(1, 2)) == []


def test_shard_losses_and_gradients_add_up_to_the_batch(mace_model_path, mixed_frames):
    """The data-parallel identity: sum over ranks of (shard loss / global counts) = batch loss."""
    backend = load_backend(mace_model_path, dtype="float64")
    weights = LossWeights(energy=100.0, forces=1.0, stress=100.0)
    name, param = next((n, p) for n, p in backend.model.named_parameters() if "linear" in n)
    trial = {name: (param.detach().clone() * 1.01).requires_grad_(True)}

    def loss_and_grad(batch):
        if batch.is_empty:
            return 0.0, torch.zeros_like(trial[name])
        out = backend.evaluate(batch.graph, compute_stress=batch.has_stress, training=True, parameters=trial)
        loss = batch_loss(out, batch, weights)
        (grad,) = torch.autograd.grad(loss, trial[name])
        return float(loss.detach()), grad

    # 13 frames in batches of 3: the last batch has one frame, so rank 1 gets an empty shard
    frames = mixed_frames[:13]
    whole = make_batches(frames, backend, 3, seed=5, process=ProcessInfo())
    shards = [make_batches(frames, backend, 3, seed=5, process=ProcessInfo(r, 2)) for r in range(2)]
    assert shards[1][-1].is_empty and not shards[0][-1].is_empty
    for k, batch in enumerate(whole):
        assert sorted(shards[0][k].frame_ids + shards[1][k].frame_ids) == sorted(batch.frame_ids)
        loss, grad = loss_and_grad(batch)
        parts = [loss_and_grad(shards[r][k]) for r in range(2)]
        assert sum(p[0] for p in parts) == pytest.approx(loss, rel=1e-12)
        torch.testing.assert_close(parts[0][1] + parts[1][1], grad, rtol=1e-10, atol=1e-14)
        assert loss > 0


def _finetune_args(model: str, out: Path) -> list[str]:
    return [
        "finetune",
        f"{ETHANOL}@:6",
        str(SILICON),
        "--valid",
        f"{ETHANOL}@100:103",
        "--base",
        model,
        "-o",
        str(out),
        "--epochs",
        "3",
        "--batch-size",
        "3",
        "--density",
        "0.05",
        "--lr",
        "0.01",
        "--dtype",
        "float64",
        "--seed",
        "7",
        "--time-budget",  # ample: planning takes its timed steps (on every rank) and undoes them
        "1e6",
        "--no-progress",
    ]


def test_torchrun_two_processes_give_the_single_process_delta(mace_model_path, tmp_path):
    """2 gloo processes on CPU (13 frames, batches of 3: uneven and empty shards) vs 1 process.

    The gradients are the same sums taken in another order, so the deltas agree to rounding
    (float64); the support (which weights changed) must be identical. Both plan their epochs
    for a time budget first (rank 0's plan for every rank), which must leave no trace.
    """
    from ase_sparsecalc.cli import main

    single = tmp_path / "single.safetensors"
    assert main(_finetune_args(mace_model_path, single)) == 0

    parallel = tmp_path / "parallel.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "ase_sparsecalc",
        *_finetune_args(mace_model_path, parallel),
    ]
    run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("weights changed") == 1  # only rank 0 prints its summary
    assert run.stderr.count("only 3 validation frame(s)") == 1  # and its warnings
    assert "time budget: planned 3 epochs, ran 3" in run.stdout

    a, b = SparseDelta.load(single), SparseDelta.load(parallel)
    assert a.nnz > 0 and set(a.tensors) == set(b.tensors)
    for name, ta in a.tensors.items():
        tb = b.tensors[name]
        np.testing.assert_array_equal(np.asarray(ta.indices), np.asarray(tb.indices))
        np.testing.assert_allclose(np.asarray(tb.values), np.asarray(ta.values), rtol=1e-9, atol=0)
    for symbol, shift in a.metadata.energy_shifts.items():
        assert b.metadata.energy_shifts[symbol] == pytest.approx(shift, rel=1e-9, abs=1e-12)


def test_a_misconfigured_data_parallel_launch_is_a_clear_error(monkeypatch):
    """WORLD_SIZE set by hand without torchrun's rendezvous variables, or CUDA asked for on a
    machine without it: configuration errors that say what to do, not torch's internals."""
    from ase_sparsecalc.errors import ConfigError
    from ase_sparsecalc.finetune.distributed import distributed_session

    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="launch with torchrun"), distributed_session("cpu"):
        pass
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="cuda"), distributed_session("cuda"):
            pass


def test_a_process_whose_peer_stopped_says_so(mace_model_path, tmp_path):
    """Processes launched by hand (RANK, WORLD_SIZE, MASTER_* set, no torchrun to stop the rest):
    rank 0 refuses an output it cannot write; rank 1, waiting for it in the first collective,
    says that another process stopped instead of reporting gloo's error as an internal one."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "blocker").write_text("a file where the output folder should be")
    argv = _finetune_args(mace_model_path, tmp_path / "blocker" / "delta.safetensors")
    processes = []
    for rank in range(2):
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "ase_sparsecalc", *argv],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    errors = []
    for proc in processes:
        try:
            errors.append(proc.communicate(timeout=240)[1])
        finally:
            proc.kill()
    assert [proc.returncode for proc in processes] == [2, 2], errors
    assert "sparsecalc finetune (rank 0 of 2): error: " in errors[0] and "blocker" in errors[0]
    assert (
        "sparsecalc finetune (rank 1 of 2): error: another process of this data-parallel run stopped"
        in errors[1]
    )
    assert "internal error" not in errors[1]
