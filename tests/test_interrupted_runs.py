"""Interrupted runs: nothing half-written, and a killed fine-tune resumes to the same delta.

The fine-tune is a real ``python -m ase_sparsecalc finetune`` process on a few ethanol frames
with the small MACE test model, killed with SIGKILL as soon as its first checkpoint exists.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ase.io import read, write

from ase_sparsecalc import SparseDelta
from ase_sparsecalc.delta_io import atomic_write_bytes
from ase_sparsecalc.errors import OutputFileError

DATA = Path(__file__).parents[1] / "examples" / "data" / "ethanol_train.xyz"
EPOCHS = 5
OPTIONS = [
    "--epochs", str(EPOCHS), "--batch-size", "3", "--lr", "0.01", "--density", "0.05",
    "--dtype", "float64", "--seed", "3", "--valid-fraction", "0", "--no-progress",
]  # fmt: skip


# Every run is a fresh one-thread process, as a user's would be: the interrupted run, its
# resumption and the uninterrupted reference then do the same floating-point work bit for bit,
# whatever earlier tests did to this process (thread pools, loaded libraries).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _finetune_argv(train: Path, output: Path, model: str) -> list[str]:
    return ["finetune", str(train), "-o", str(output), "--base", model, *OPTIONS]


def _run_cli(argv: list[str]) -> None:
    """``python -m ase_sparsecalc ARGV`` in a fresh process; fails the test on a non-zero exit."""
    done = subprocess.run([sys.executable, "-m", "ase_sparsecalc", *argv], env=ENV, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()


def _signal_after_first_checkpoint(argv: list[str], checkpoint: Path, signum: int) -> tuple[int, str]:
    """Run ``python -m ase_sparsecalc ARGV``, send ``signum`` as soon as ``checkpoint`` exists;
    returns the exit status and stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ase_sparsecalc", *argv],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.02)
        proc.send_signal(signum)
        stderr = proc.communicate(timeout=60)[1].decode()
    finally:
        proc.kill()
        proc.wait()
    return proc.returncode, stderr


def test_killed_finetune_resumes_to_the_uninterrupted_delta(mace_model_path, tmp_path):
    train = tmp_path / "ethanol6.extxyz"
    write(train, read(DATA, ":6"))
    killed_out = tmp_path / "killed" / "delta.safetensors"
    checkpoint = killed_out.with_name("delta_checkpoint") / "checkpoint.pt"
    returncode, _ = _signal_after_first_checkpoint(
        _finetune_argv(train, killed_out, mace_model_path), checkpoint, signal.SIGKILL
    )
    assert returncode == -signal.SIGKILL
    assert not killed_out.exists(), "the run finished before it was killed; the test proves nothing"

    # the checkpoint the killed process left is complete and loadable
    state = torch.load(checkpoint, weights_only=True)
    assert 1 <= state["state"]["epoch"] < EPOCHS
    assert not any(p.suffix == ".safetensors" for p in killed_out.parent.iterdir())

    _run_cli([*_finetune_argv(train, killed_out, mace_model_path), "--resume"])
    reference_out = tmp_path / "reference" / "delta.safetensors"
    _run_cli(_finetune_argv(train, reference_out, mace_model_path))

    resumed, reference = SparseDelta.load(killed_out), SparseDelta.load(reference_out)
    assert reference.nnz > 0
    assert list(resumed.tensors) == list(reference.tensors)
    for name, tensor in reference.tensors.items():
        assert torch.equal(resumed.tensors[name].indices, tensor.indices), name
        assert torch.equal(resumed.tensors[name].values, tensor.values), name
    assert resumed.metadata.energy_shifts == reference.metadata.energy_shifts
    resumed_state = torch.load(checkpoint, weights_only=True)["state"]
    assert resumed_state["epoch"] == EPOCHS and len(resumed_state["history"]) == EPOCHS


def test_sigterm_stops_a_finetune_as_ctrl_c_does(mace_model_path, tmp_path):
    """A batch scheduler ends a job with SIGTERM: one line, exit status 143, the checkpoint kept."""
    train = tmp_path / "ethanol6.extxyz"
    write(train, read(DATA, ":6"))
    output = tmp_path / "out" / "delta.safetensors"
    checkpoint = output.with_name("delta_checkpoint") / "checkpoint.pt"
    argv = [*_finetune_argv(train, output, mace_model_path), "--epochs", "500"]
    returncode, stderr = _signal_after_first_checkpoint(argv, checkpoint, signal.SIGTERM)
    assert returncode == 128 + signal.SIGTERM, stderr
    last_line = stderr.strip().splitlines()[-1]
    assert (
        last_line == "sparsecalc finetune: stopped by SIGTERM (--resume continues from the last checkpoint)"
    )
    assert "Traceback" not in stderr
    assert not output.exists()
    assert sorted(p.name for p in output.parent.iterdir()) == ["delta_checkpoint"]  # no temporary files
    assert [p.name for p in checkpoint.parent.iterdir()] == ["checkpoint.pt"]
    torch.load(checkpoint, weights_only=True)  # complete


def test_an_interruption_before_any_checkpoint_promises_no_resume(tmp_path, monkeypatch, capsys):
    from ase_sparsecalc.cli import main

    def interrupted_while_loading(*args, **kwargs):
        raise KeyboardInterrupt

    # the package's ``finetune`` attribute is the function; patch the subpackage's module object
    monkeypatch.setattr(
        sys.modules["ase_sparsecalc.finetune"], "finetune_with_report", interrupted_while_loading
    )
    assert main(["finetune", str(DATA), "-o", str(tmp_path / "d.safetensors")]) == 130
    assert capsys.readouterr().err.strip() == "sparsecalc finetune: interrupted"


def test_atomic_write_keeps_old_content_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    atomic_write_bytes(path, b"old, complete")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OutputFileError, match=r"report\.json: writing failed"):
        atomic_write_bytes(path, b"new" * 100_000)
    monkeypatch.undo()
    assert path.read_bytes() == b"old, complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"], "temporary file left behind"


def test_atomic_write_gives_ordinary_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        fresh = atomic_write_bytes(tmp_path / "new.safetensors", b"x")
        assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
        kept = tmp_path / "shared.json"
        kept.write_bytes(b"{}")
        kept.chmod(0o640)
        atomic_write_bytes(kept, b"[]")
        assert stat.S_IMODE(kept.stat().st_mode) == 0o640
    finally:
        os.umask(umask)


def test_report_of_a_diverged_run_is_standard_json(tmp_path):
    """NaN and inf (a diverged loss) become null, which strict JSON readers accept."""
    import json

    import numpy as np

    from ase_sparsecalc.finetune.report import write_report

    report = {"loss": [0.5, float("nan")], "best": np.float32("inf"), "errors": np.array([1.0, 2.0])}
    text = write_report(report, tmp_path).read_text()

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    assert json.loads(text, parse_constant=refuse) == {
        "loss": [0.5, None],
        "best": None,
        "errors": [1.0, 2.0],
    }
