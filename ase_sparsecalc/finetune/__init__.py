"""Fine-tune a sparse delta on DFT data: ``finetune(base, train, valid=None, **options)``.

Steps: read and validate the frames; fit per-element energy shifts (the ``shift`` baseline);
train the delta with the chosen method; re-fit the shifts; save the delta (and, when asked, a
report with errors before/after and plots). See :class:`FinetuneConfig` for every option.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ase import Atoms
from ase.data import atomic_numbers, ground_state_magnetic_moments

from ..backends import Backend, WeightInfo, load_backend
from ..backends.base import PathSegment
from ..delta import DeltaMetadata, SparseDelta
from ..delta_io import check_writable, overwritten_input
from ..errors import ConfigError, EmptyDatasetError, OutputFileError
from ..graph import SPIN_KEY, build_graph
from ..weight_map import TRAINABLE_KEY
from .batches import make_batches, predict
from .budget import plan_epochs
from .config import RESUMABLE_CHANGES, FinetuneConfig
from .data import Frame, read_frames, split_path_index
from .dataset import (
    check_elements_in_training,
    dataset_summary,
    read_isolated_atom_energies,
    split_frames,
    take_isolated_atoms,
)
from .distributed import ProcessInfo, distributed_session
from .duplicates import check_duplicates, drop_duplicate_frames
from .label_checks import check_labels, warn_if_labels_are_the_base_models
from .methods import METHODS, MethodOptions
from .metrics import METRIC_UNITS, error_metrics, worsened_errors
from .reference import fit_energy_shifts, predicted_energies, with_energy_shifts
from .trainer import CHECKPOINT_NAME, Trainer

logger = logging.getLogger(__name__)

FEW_VALID_FRAMES = 10
"""Below this many validation frames a warning says that epoch selection rests on few frames."""

FEW_STEPS = 100
"""Below this many optimizer steps a warning says the density schedule has too few to work with."""

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune", "finetune_with_report", "read_frames"]

FrameSource = str | Path | Atoms | Sequence[str | Path | Atoms] | Sequence[Frame]


@dataclasses.dataclass
class FinetuneResult:
    """What :func:`finetune_with_report` returns.

    Attributes
    ----------
    delta : SparseDelta
    report : dict
        The report (errors before and after in meV/atom, meV/Å and GPa, density, timings, ...),
        as written to ``report.json``.
    paths : dict of str to Path
        The files written (``"delta"``, ``"report"``, plots), by kind.
    """

    delta: SparseDelta
    report: dict
    paths: dict[str, Path]


def finetune(
    base: str | Path | Backend | None, train: FrameSource, valid: FrameSource | None = None, **options
) -> SparseDelta:
    """Fit a sparse delta (plus per-element energy shifts) of ``base`` to DFT frames.

    Parameters
    ----------
    base : str, Path, Backend or None
        Named foundation model, model file, or loaded backend (None: SevenNet-0).
    train : path(s), Atoms or Frames
        Training frames; files in any ASE-readable format, ``"file@slice"`` allowed.
    valid : same, optional
        Validation frames (default: ``valid_fraction`` of ``train`` held out).
    **options
        :class:`FinetuneConfig` fields (``method``, ``density``, ``epochs``, ``lr``, ...) and
        ``output`` (delta path), ``report_dir``, ``checkpoint_dir``, ``resume``, ``progress``,
        ``head`` (output head of a multi-head MACE model to fit through), ``isolated_atoms``,
        ``energy_key``, ``forces_key``, ``stress_key``, ``virial_key``, ``file_format`` (ASE
        format of the train and valid files; None: guessed), ``drop_duplicates``,
        ``allow_missing_forces``.

    Returns
    -------
    SparseDelta
        Also saved to ``output`` when given.
    """
    return finetune_with_report(base, train, valid, **options).delta


def finetune_with_report(
    base: str | Path | Backend | None,
    train: FrameSource,
    valid: FrameSource | None = None,
    *,
    output: str | Path | None = None,
    report_dir: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    head: str | None = None,
    isolated_atoms: str | Path | dict | None = None,
    energy_key: str | None = None,
    forces_key: str | None = None,
    stress_key: str | None = None,
    virial_key: str | None = None,
    file_format: str | None = None,
    drop_duplicates: bool | str = False,
    allow_missing_forces: bool = False,
    config: FinetuneConfig | None = None,
    callbacks: Sequence = (),
    **options,
) -> FinetuneResult:
    """:func:`finetune`, also returning the report (and writing it when ``report_dir`` is set).

    ``drop_duplicates=True`` (or ``"first"``) keeps the first of repeated structures (a
    restarted run's first frame, say) instead of refusing them; ``"last"`` keeps the last (the
    final SCF of a Quantum ESPRESSO ``vc-relax``). ``allow_missing_forces=True`` trains frames
    without forces on their energies (and stresses) instead of refusing them. Under ``torchrun``
    (``WORLD_SIZE > 1``) the processes train data-parallel (see :mod:`.distributed`); every rank
    returns the same delta and only rank 0 writes files.
    """
    config = _config_from(config, options)
    with _own_random_state(), distributed_session(config.device) as process:
        return _finetune_in_session(
            process,
            base,
            train,
            valid,
            output=output,
            report_dir=report_dir,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            progress=progress,
            head=head,
            isolated_atoms=isolated_atoms,
            energy_key=energy_key,
            forces_key=forces_key,
            stress_key=stress_key,
            virial_key=virial_key,
            file_format=file_format,
            drop_duplicates=drop_duplicates,
            allow_missing_forces=allow_missing_forces,
            config=config,
            callbacks=callbacks,
        )


def _own_random_state():
    """torch's global random state, seeded by the run, restored afterwards: a fine-tune leaves the
    caller's random numbers as they were."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices)


def _config_from(config: FinetuneConfig | None, options: dict[str, Any]) -> FinetuneConfig:
    """``config``, or a :class:`FinetuneConfig` of ``options``; refuses both at once (the options
    would be ignored) and names options that are no field, with the closest field."""
    if config is not None:
        if options:
            raise ConfigError(
                f"give either config= or options ({', '.join(sorted(options))}), not both; "
                "dataclasses.replace(config, ...) changes a config"
            )
        return config
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        import difflib

        known = fields | set(inspect.signature(finetune_with_report).parameters) - {"options"}
        named = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1)
            named.append(name + (f" (did you mean {close[0]}?)" if close else ""))
        raise ConfigError(f"unknown fine-tuning option(s): {', '.join(named)}")
    return FinetuneConfig(**options)


def _finetune_in_session(
    process: ProcessInfo,
    base: str | Path | Backend | None,
    train: FrameSource,
    valid: FrameSource | None,
    *,
    output: str | Path | None,
    report_dir: str | Path | None,
    checkpoint_dir: str | Path | None,
    resume: bool,
    progress: bool,
    head: str | None,
    isolated_atoms: str | Path | dict | None,
    energy_key: str | None,
    forces_key: str | None,
    stress_key: str | None,
    virial_key: str | None,
    file_format: str | None,
    drop_duplicates: bool | str,
    allow_missing_forces: bool,
    config: FinetuneConfig,
    callbacks: Sequence,
) -> FinetuneResult:
    started = time.monotonic()
    if process.is_main:  # refuse an unwritable destination now, not after hours of training
        _refuse_output_over_inputs(
            output,
            {
                "training data": train,
                "validation data": valid,
                "isolated-atom energies": isolated_atoms,
                "base model": base,
            },
        )
        _check_outputs_writable(output, report_dir, checkpoint_dir)
    torch.manual_seed(config.seed)
    keys = {
        "energy_key": energy_key,
        "forces_key": forces_key,
        "stress_key": stress_key,
        "virial_key": virial_key,
        "file_format": file_format,
        "require_forces": not allow_missing_forces,
    }
    backend = load_backend(base, device=process.device, dtype=config.dtype, head=head)
    train_frames, valid_frames, isolated, split_warnings = _read_and_check_frames(
        process, backend, train, valid, keys, isolated_atoms, energy_key, drop_duplicates, config
    )
    if process.is_main and process.world_size > config.batch_size:
        message = (
            f"batch_size {config.batch_size} is smaller than the number of processes "
            f"({process.world_size}): {process.world_size - config.batch_size} of them idle at every "
            "step; raise batch_size to use them"
        )
        logger.warning(message)
        split_warnings.append(message)
    train_batches = make_batches(train_frames, backend, config.batch_size, seed=config.seed)
    valid_batches = make_batches(valid_frames, backend, config.batch_size) if valid_frames else []
    base_train = predict(backend, train_batches)
    base_valid = predict(backend, valid_batches)
    prior = _isolated_atom_prior(backend, isolated) if isolated else None
    shifts = fit_energy_shifts(train_frames, predicted_energies(base_train, len(train_frames)), prior)
    shifts.update(_shifts_of_untrained_elements(prior, shifts))
    backend.add_energy_shifts(shifts)
    slopes, data_warnings = {}, list(split_warnings)
    if process.is_main:
        sources = _describe(train) + (f", {_describe(valid)}" if valid is not None else "")
        slopes, label_warnings = check_labels(
            train_frames,
            valid_frames,
            base_train,
            base_valid,
            isolated,
            backend.takes_charge_and_spin,
            sources,
        )
        data_warnings += label_warnings
    before = {
        "train": error_metrics(train_frames, with_energy_shifts(base_train, train_frames, shifts)),
        "valid": error_metrics(valid_frames, with_energy_shifts(base_valid, valid_frames, shifts))
        if valid_frames
        else {},
    }
    if process.is_main:
        errors = before["valid" if valid_frames else "train"]
        logger.info(
            "%d training and %d validation frames; base model with energy shifts on the %s frames: %s",
            len(train_frames),
            len(valid_frames),
            "validation" if valid_frames else "training",
            ", ".join(
                f"{name} {errors[key]:.3g} {unit}"
                for name, key, unit in (
                    ("energy MAE", "energy_mae", "meV/atom"),
                    ("force MAE", "forces_mae", "meV/Å"),
                    ("stress MAE", "stress_mae", "GPa"),
                )
                if key in errors
            ),
        )
    echo = warn_if_labels_are_the_base_models(before["train"], train_frames) if process.is_main else None
    data_warnings += [echo] if echo else []

    training = _Training()
    if config.method != "shift":
        training = _train_weights(
            process, backend, config, train_frames, valid_frames, train_batches, valid_batches,
            checkpoint_dir=checkpoint_dir, resume=resume, progress=progress, callbacks=callbacks,
        )  # fmt: skip
        data_warnings += training.warnings

    delta = SparseDelta(
        training.tensors,
        _metadata(backend, config, shifts, train_frames, valid_frames, train, training.trainable, isolated),
    )
    delta.metadata.hyperparameters.update(training.state_info)  # how the run went, beside what was asked for
    if process.is_main and config.method == "sparse" and config.density is None and delta.density > 0.5:
        message = (
            f"the l1 penalty ({config.penalty:g}) left {100 * delta.density:.1f} % of the weights changed: "
            "the penalty form controls the density weakly; give a target density (--density 0.03) for a "
            "sparse delta"
        )
        logger.warning(message)
        data_warnings.append(message)
    backend.set_energy_shifts_by_number({})
    if config.refit_shifts and config.method != "shift":
        _refit_shifts(backend, delta, train_frames, train_batches)
    with delta.applied(backend):
        after_train, after_valid = predict(backend, train_batches), predict(backend, valid_batches)
    after = {
        "train": error_metrics(train_frames, after_train),
        "valid": error_metrics(valid_frames, after_valid) if valid_frames else {},
    }
    # a run cut short by max_time, or too short for its density schedule, has its own warning,
    # which names the cause better than labels pulling against each other
    cut_short = training.state_info.get("stop_reason") == "max_time" or training.too_few_steps
    traded = (
        _warn_if_forces_were_traded(before["train"], after["train"], config)
        if process.is_main and not cut_short
        else None
    )
    data_warnings += [traded] if traded else []
    split = "valid" if valid_frames else "train"
    worse = _warn_if_parts_got_worse(before[split], after[split], split, config) if process.is_main else None
    data_warnings += [worse] if worse else []

    report = {
        "base": backend.model_name,
        "backend": backend.name,
        "method": config.method,
        "density": delta.density,
        "nnz": delta.nnz,
        "trainable_weights": sum(i.numel for i in training.trainable),
        "energy_shifts_eV": delta.metadata.energy_shifts,
        "before": before,
        "after": after,
        "training": training.state_info,
        "wall_time_s": time.monotonic() - started,
        "config": config.to_dict(),
        "data": delta.metadata.training_data,
        "data_checks": {"label_slopes": slopes, "warnings": data_warnings},
        "history": training.history,
        "units": {**METRIC_UNITS, "energy_shifts_eV": "eV/atom", "wall_time_s": "s", "training_time_s": "s"},
    }
    paths: dict[str, Path] = {}
    if output is not None and process.is_main:
        paths["delta"] = delta.save(output)
    if report_dir is not None and process.is_main:
        paths.update(
            _write_report_files(
                report,
                report_dir,
                delta,
                backend,
                valid_frames or train_frames,
                base_valid if valid_frames else base_train,
                shifts,
                after_valid if valid_frames else after_train,
            )
        )
    return FinetuneResult(delta, report, paths)


def _read_and_check_frames(
    process: ProcessInfo,
    backend: Backend,
    train: FrameSource,
    valid: FrameSource | None,
    keys: dict,
    isolated_atoms: str | Path | dict | None,
    energy_key: str | None,
    drop_duplicates: bool | str,
    config: FinetuneConfig,
) -> tuple[list[Frame], list[Frame], dict[str, float], list[str]]:
    """Training and validation frames, checked, the isolated-atom energies (eV) given, and the
    warnings given.

    Reads the frames, takes isolated atoms out, refuses unknown elements and repeated
    structures (or drops them), and splits validation frames off the training frames when
    none are given; warns when few or none are left for validation.
    """
    train_frames = _frames(train, keys)
    valid_frames = _frames(valid, keys) if valid is not None else None
    (train_frames, kept_valid), tagged = take_isolated_atoms(train_frames, valid_frames or [])
    if valid_frames is not None:
        if not kept_valid:
            raise EmptyDatasetError(f"{_describe(valid)}: only isolated-atom frames, nothing to validate on")
        valid_frames = kept_valid
    if not train_frames:
        raise EmptyDatasetError(f"{_describe(train)}: only isolated-atom frames, nothing to train on")
    for frame in train_frames + (valid_frames or []):  # before any other check or warning
        backend.check_elements(frame.atoms.numbers, frame.source)
    isolated = _isolated_atom_energies(tagged, isolated_atoms, energy_key)
    if drop_duplicates:  # before the split, so that no pair straddles train and validation
        keep = "first" if drop_duplicates is True else drop_duplicates
        train_frames, kept_valid = drop_duplicate_frames(train_frames, valid_frames or [], keep=keep)
        if valid_frames is not None:
            valid_frames = kept_valid
    check_duplicates(train_frames + (valid_frames or []))  # in reading order, before the split
    if valid_frames is None:
        train_frames, valid_frames = split_frames(train_frames, config.valid_fraction, config.seed)
    check_elements_in_training(train_frames, valid_frames)
    warnings = []
    if process.is_main and config.method != "shift":  # one copy under torchrun; shift has no epochs
        if not valid_frames and (valid is not None or config.valid_fraction > 0):
            warnings.append(
                "no validation frames (too few frames to hold any out, or every frame's composition is "
                "needed in training): the best epoch and early stopping are chosen on the training "
                "loss; pass validation frames (valid=..., --valid) to check against held-out data"
            )
        elif 0 < len(valid_frames) < FEW_VALID_FRAMES:
            warnings.append(
                f"only {len(valid_frames)} validation frame(s): the best epoch (restored at the end) and "
                "early stopping are chosen on them; pass more (valid=... or a larger valid_fraction) "
                "where you can"
            )
    for message in warnings:
        logger.warning(message)
    return train_frames, valid_frames, isolated, warnings


@dataclasses.dataclass
class _Training:
    """What training the weights gave: the delta's tensors, the per-epoch history, how the run
    went (epochs, time, best epoch, why it stopped), the trainable weights and any warnings."""

    tensors: dict = dataclasses.field(default_factory=dict)
    history: list = dataclasses.field(default_factory=list)
    state_info: dict = dataclasses.field(default_factory=dict)
    trainable: list[WeightInfo] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    too_few_steps: bool = False


def _train_weights(
    process: ProcessInfo,
    backend: Backend,
    config: FinetuneConfig,
    train_frames: list[Frame],
    valid_frames: list[Frame],
    train_batches: list,
    valid_batches: list,
    *,
    checkpoint_dir: str | Path | None,
    resume: bool,
    progress: bool,
    callbacks: Sequence,
) -> _Training:
    """Train the delta's weights with the configured method (all but ``shift``), from a
    checkpoint where ``resume`` finds one."""
    _refuse_a_run_with_nothing_to_fit(config, train_frames)
    trainable = trainable_infos(backend, config)
    numel = sum(info.numel for info in trainable)
    if config.density is not None and config.density * numel < 1:
        raise ConfigError(
            f"density {config.density:g} of {numel} trainable weights keeps no weight; "
            f"the smallest useful density is 1/{numel} = {1 / numel:.2g}"
        )
    method = _make_method(backend, trainable, config)
    data_id = dataset_summary(train_frames)["sha256"] + dataset_summary(valid_frames)["sha256"]
    trainer = Trainer(
        backend,
        method,
        train_batches,
        valid_batches,
        config,
        checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir else None,
        fingerprint=_run_fingerprint(backend, config, data_id),
        callbacks=callbacks,
    )
    if resume:
        checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
        if checkpoint is not None and checkpoint.is_file():
            trainer.load_checkpoint(checkpoint)
        else:
            where = checkpoint or "(no checkpoint directory given)"
            logger.warning("no checkpoint at %s to resume from: starting afresh", where)
    if config.time_budget is not None and trainer.state.step == 0:
        plan_epochs(trainer, config.time_budget)
    short = _warn_if_too_few_steps(trainer.total_steps, config) if process.is_main else None
    state = trainer.train(progress=progress)
    history = state.history
    state_info = {
        "epochs_run": state.epoch,
        "training_time_s": history[-1]["wall_time"] if history else 0.0,  # across resumed runs
        "best_epoch": state.best_epoch if state.best_epoch > 0 else None,  # None: no epoch completed
        "stop_reason": state.stop_reason,
    }
    if state.planned_epochs is not None:
        state_info["epochs_planned"] = state.planned_epochs
    return _Training(
        method.export(), history, state_info, trainable, [short] if short else [], too_few_steps=bool(short)
    )


def _warn_if_forces_were_traded(before: dict, after: dict, config: FinetuneConfig) -> str | None:
    """Warn when training made the force error on the training frames worse: the loss then
    improved through the energies or stresses at the forces' expense, the mark of labels that
    disagree with each other (a Pulay stress in some frames, energies from other settings).
    Returns the message, or None."""
    was, now = before.get("forces_mae"), after.get("forces_mae")
    if (
        config.method == "shift"
        or not config.forces_weight
        or was is None
        or now is None
        or now <= 1.01 * was
    ):
        return None
    gains = [
        f"{name} {before[key]:.3g} -> {after[key]:.3g} {unit}"
        for name, key, unit in (("energy", "energy_mae", "meV/atom"), ("stress", "stress_mae", "GPa"))
        if key in before and key in after and after[key] < before[key]
    ]
    message = (
        f"training made the force error on its own frames worse ({was:.3g} -> {now:.3g} meV/Å)"
        + (f" while improving {', '.join(gains)}" if gains else "")
        + ": the labels pull against each other. Check the stresses (a Pulay stress in some "
        "frames: converge the cutoff for every element) and energies (one set of DFT settings "
        "throughout), or weigh the stress less (--stress-weight)"
    )
    logger.warning(message)
    return message


def _warn_if_parts_got_worse(before: dict, after: dict, split: str, config: FinetuneConfig) -> str | None:
    """Warn when errors on the reported frames (``split``: "valid" or "train") grew while
    training: a total on the validation frames, or a part on either: the force error of one
    element, one stress component, or one ``config_type``. A lower total can hide a part, and a
    user who relies on it (shear stresses for elastic constants, one element's forces) needs to
    know. Returns the message."""
    if config.method == "shift":
        return None  # energy shifts move no force or stress
    weights = {
        "energy_mae": config.energy_weight,
        "forces_mae": config.forces_weight,
        "stress_mae": config.stress_weight,
    }
    # on the training frames, a total that grew is _warn_if_forces_were_traded's business
    kinds = [key for key, weight in weights.items() if weight]
    worse = worsened_errors(before, after, kinds, totals=split == "valid")
    if not worse:
        return None
    frames = "validation" if split == "valid" else "training"
    counts = f"{after.get('frames', 0)} frames, {after.get('stress_frames', 0)} with stresses"
    message = (
        f"on the {frames} frames ({counts}) training made some errors worse than the base "
        f"model's: {'; '.join(worse)}. Few frames make these noisy; otherwise give frames "
        "that cover what got worse (strains of that kind, that element's environments, that "
        "config_type), or train fewer epochs"
    )
    logger.warning(message)
    return message


def _warn_if_too_few_steps(steps: int, config: FinetuneConfig) -> str | None:
    """Warn when a run has too few optimizer steps for its density schedule to choose a support
    (it would go from dense to the target density in a handful of steps); returns the message."""
    if config.method not in ("sparse", "gmp", "l1") or config.density is None or steps >= FEW_STEPS:
        return None
    message = (
        f"this run has {steps} optimizer step(s) (epochs x batches per epoch), too few for the "
        f"density schedule to choose {config.density:.3g} of the weights (it needs hundreds): "
        "give more frames or epochs, or expect a delta worse than the energy shifts alone"
    )
    logger.warning(message)
    return message


def _check_outputs_writable(
    output: str | Path | None, report_dir: str | Path | None, checkpoint_dir: str | Path | None
) -> None:
    """Raise :class:`~ase_sparsecalc.errors.OutputFileError` naming the first file that could not
    be written (the delta, the report or the checkpoint)."""
    from .report import REPORT_NAME

    paths = [
        output,
        Path(report_dir) / REPORT_NAME if report_dir is not None else None,
        Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None,
    ]
    for path in paths:
        if path is not None:
            check_writable(path)


def _refuse_output_over_inputs(output: str | Path | None, inputs: dict[str, object]) -> None:
    """Raise :class:`~ase_sparsecalc.errors.OutputFileError` when the delta would be written over
    one of the run's own input files (``-o train.xyz``: the DFT data would be lost)."""
    if output is None:
        return
    files = []
    for what, source in inputs.items():
        specs = source if isinstance(source, Sequence) and not isinstance(source, str) else [source]
        for spec in specs:
            if isinstance(spec, (str, Path)):  # not Atoms, frames, a loaded backend or a dict
                files.append((what, split_path_index(spec)[0]))
    found = overwritten_input(output, files)
    if found is not None:
        raise OutputFileError(
            f"{output}: is this run's {found}; writing the delta there would replace it. "
            "Choose another output name (-o), e.g. one ending in .safetensors"
        )


def _frames(source: FrameSource, keys: dict) -> list[Frame]:
    if isinstance(source, Sequence) and source and all(isinstance(f, Frame) for f in source):
        return list(source)
    return read_frames(source, **keys)


def trainable_infos(backend: Backend, config: FinetuneConfig) -> list[WeightInfo]:
    """The tensors a method may change: path weights (readouts optional, and with
    ``train_scalars`` the parameters outside the weight tensors); every parameter for ``full``."""
    if config.method == "full":
        return backend.weight_infos() + scalar_infos(backend)
    infos = [
        i
        for i in backend.weight_infos()
        if (config.train_readouts or not i.is_readout) and i.kind not in config.exclude_kinds
    ]
    return infos + scalar_infos(backend) if config.train_scalars else infos


def scalar_infos(backend: Backend) -> list[WeightInfo]:
    """The model's floating-point parameters outside :meth:`Backend.weight_infos`, as flat
    tensors of kind ``"other"`` (SevenNet: radial-basis frequencies, neighbour-count
    normalisations, per-element energy scale and shift)."""
    covered = {i.name for i in backend.weight_infos()}
    infos = []
    for name, param in backend.model.named_parameters():
        if name not in covered and param.is_floating_point() and param.numel():
            shape = tuple(param.shape)
            segment = PathSegment(0, param.numel(), None, None, shape)
            infos.append(WeightInfo(name, shape, None, name, "other", "flat", (segment,)))
    return infos


def _make_method(backend: Backend, infos: list[WeightInfo], config: FinetuneConfig):
    options = MethodOptions(
        density=config.density,
        penalty=config.penalty,
        warmup_fraction=config.warmup_fraction,
        prune_end_fraction=config.prune_end_fraction,
        rank=config.rank,
        straight_through=config.straight_through,
        learn_thresholds=config.learn_thresholds,
        ste_scale=config.ste_scale,
        settle_support=config.settle_support,
        hard_threshold=config.hard_threshold,
        masked_decay=config.masked_decay,
        dense_kinds=config.dense_kinds,
        selection=config.selection,
        seed=config.seed,
        scalar_lr_factor=config.scalar_lr_factor,
    )
    params = dict(backend.model.named_parameters())
    method = METHODS[config.method](infos, {i.name: params[i.name] for i in infos}, options)
    return method.to(backend.device)


def _refuse_a_run_with_nothing_to_fit(config: FinetuneConfig, frames: list[Frame]) -> None:
    """Raise ConfigError when no label of the training frames carries a positive loss weight."""
    weighted = [
        ("energies", config.energy_weight, True),
        ("forces", config.forces_weight, any(f.forces is not None for f in frames)),
        ("stresses", config.stress_weight, any(f.stress is not None for f in frames)),
    ]
    if not any(weight > 0 and present for _, weight, present in weighted):
        present = [name for name, _, there in weighted if there]
        raise ConfigError(
            f"the training frames have {', '.join(present)}, and every one of them has loss weight 0: "
            "nothing to fit (--energy-weight, --forces-weight, --stress-weight)"
        )


def _run_fingerprint(backend: Backend, config: FinetuneConfig, data_id: str) -> str:
    """What a checkpoint must match to be resumed: ``"base model=…;data set=…;training options=…"``, a
    hash of each part (the base model with its output head), so that a refusal can say which
    part differs (:meth:`Trainer.load_checkpoint`)."""
    relevant = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES}
    parts = {
        "base model": f"{backend.fingerprint}|{getattr(backend, 'head', None)}",
        "data set": data_id,
        "training options": repr(sorted(relevant.items())),
    }
    return ";".join(f"{k}={hashlib.sha256(v.encode()).hexdigest()[:32]}" for k, v in parts.items())


def _describe(source: FrameSource) -> str:
    """A frame source for messages: its file names, or how many structures it holds."""
    items = [source] if isinstance(source, (str, Path, Atoms)) else list(source)
    names = [str(s) for s in items if isinstance(s, (str, Path))]
    return ", ".join(names) if names else f"the {len(items)} structures given"


def _isolated_atom_energies(
    tagged: dict[str, float], given: str | Path | dict | None, energy_key: str | None = None
) -> dict[str, float]:
    """Isolated-atom DFT energies (eV) by element: those given explicitly, else those tagged in the data.

    An explicit value that disagrees with a tagged one by more than 1 meV wins, with a warning.
    """
    explicit = read_isolated_atom_energies(given, energy_key) if given is not None else {}
    if tagged:
        logger.warning(
            "isolated-atom frames in the data (%s) are used as isolated-atom energies, not trained on",
            ", ".join(sorted(tagged)),
        )
    for symbol in sorted(set(tagged) & set(explicit)):
        if abs(tagged[symbol] - explicit[symbol]) > 1e-3:
            logger.warning(
                "isolated %s atom: %.6f eV in the data, %.6f eV given explicitly; using the explicit one",
                symbol,
                tagged[symbol],
                explicit[symbol],
            )
    return {**tagged, **explicit}


def _isolated_atom_prior(backend: Backend, isolated: dict[str, float]) -> dict[str, float]:
    """Isolated-atom DFT energy (eV) minus the model's isolated-atom energy, per element given
    that the base model knows.

    A model with a spin input evaluates each atom in its ground-state spin multiplicity
    (Hund's rule, :data:`ase.data.ground_state_magnetic_moments` + 1: a doublet H, a triplet O),
    the state isolated-atom DFT energies are computed in.
    """
    known = {int(z) for z in backend.atomic_numbers}
    dft = {s: e for s, e in isolated.items() if atomic_numbers[s] in known}
    if not dft:
        return {}
    atoms = [Atoms(symbol) for symbol in dft]
    for a in atoms:
        a.center(vacuum=10.0)
        if backend.takes_charge_and_spin:
            a.info[SPIN_KEY] = round(float(ground_state_magnetic_moments[a.numbers[0]])) + 1
    graph = build_graph(atoms, backend.cutoff, backend.device, backend.dtype)
    model = backend.evaluate(graph, compute_forces=False).energy.detach().double().cpu().numpy()
    return {symbol: dft[symbol] - float(e) for symbol, e in zip(dft, model, strict=True)}


def _shifts_of_untrained_elements(
    prior: dict[str, float] | None, fitted: dict[str, float]
) -> dict[str, float]:
    """Shifts (eV/atom) of elements with an isolated-atom energy but in no training frame.

    Nothing in the data fits them, so they are the isolated-atom differences themselves: the
    calibrated model then puts such an element's isolated atom at its DFT energy, on the DFT
    code's zero of energy, instead of the base model's (all-electron codes: thousands of eV
    away). Its interactions are the base model's, changed by the delta but checked by no DFT.
    """
    extra = {s: v for s, v in (prior or {}).items() if s not in fitted}
    if extra:
        logger.info(
            "energy shifts of %s from their isolated-atom energies only (no training frame holds them)",
            ", ".join(extra),
        )
    return extra


def _refit_shifts(backend: Backend, delta: SparseDelta, frames: list[Frame], batches) -> None:
    """Least-squares correction of the delta's shifts on top of the calibrated model (in place)."""
    with delta.applied(backend):
        predictions = predict(backend, batches)
    correction = fit_energy_shifts(frames, predicted_energies(predictions, len(frames)))
    for symbol, value in correction.items():
        delta.metadata.energy_shifts[symbol] = delta.metadata.energy_shifts.get(symbol, 0.0) + value
    logger.debug("shifts refitted by %s", correction)


def _metadata(
    backend, config, shifts, train_frames, valid_frames, train_source, trainable, isolated
) -> DeltaMetadata:
    """The delta's metadata; ``trainable`` (the weight infos the method could change) is recorded
    by name under ``hyperparameters["trainable_tensors"]`` (read by ``inspect``) and counted in
    ``trainable_numel`` (the denominator of the density)."""
    files = [
        str(s)
        for s in (
            [train_source]
            if isinstance(train_source, (str, Path))
            else [s for s in train_source if isinstance(s, (str, Path))]
        )
    ]
    summary = dataset_summary(train_frames, files)
    summary["valid_frames"] = len(valid_frames)
    if isolated:
        used = sorted((s for s in isolated if s in shifts), key=atomic_numbers.__getitem__)
        summary["isolated_atom_energies_eV"] = {s: isolated[s] for s in used}
    hyperparameters = config.to_dict()
    if trainable:
        hyperparameters[TRAINABLE_KEY] = sorted(i.name for i in trainable)
    meta = DeltaMetadata(
        dtype=config.dtype,
        energy_shifts=dict(shifts),
        method=config.method,
        hyperparameters=hyperparameters,
        training_data=summary,
        trainable_numel=sum(i.numel for i in trainable) or None,
    )
    return backend.fill_metadata(meta)


def _write_report_files(
    report, directory, delta, backend, frames, base_pred, shifts, after_pred
) -> dict[str, Path]:
    from .report import plot_learning_curves, plot_parity, plot_sparsity, tensor_density_rows, write_report

    directory = Path(directory)
    paths = {"report": write_report(report, directory)}
    before = with_energy_shifts(base_pred, frames, shifts)
    paths["parity"] = plot_parity(
        frames,
        before,
        after_pred,
        directory / "parity.png",
        title=f"{report['method']} delta on {report['base']}",
    )
    if report["history"]:
        paths["learning_curves"] = plot_learning_curves(report["history"], directory / "learning_curves.png")
    if delta.tensors:
        rows = tensor_density_rows(delta, trainable_infos(backend, FinetuneConfig(**report["config"])))
        paths["sparsity"] = plot_sparsity(
            rows, directory / "sparsity.png", title=f"density {100 * delta.density:.2f} %"
        )
    for name in ("learning_curves", "sparsity"):  # an earlier run's plot beside this report would mislead
        if name not in paths:
            (directory / f"{name}.png").unlink(missing_ok=True)
    return paths
