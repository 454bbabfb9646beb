"""Exceptions raised by ase_sparsecalc.

Every error names the file (and frame, where there is one) and says what was wrong. All of them
derive from :class:`SparseCalcError`, so ``except SparseCalcError`` catches everything this
package raises on purpose; the command line prints such errors in one line and exits non-zero.

Hierarchy::

    SparseCalcError
    ├── ConfigError                an option has a value that is not allowed (device, dtype, ...)
    ├── OutputFileError            an output file (delta, report, checkpoint) cannot be written
    ├── CheckpointError            a training checkpoint cannot be used to resume
    ├── PeerStoppedError           another process of a data-parallel fine-tune stopped
    ├── TrainingDivergedError      the training loss became NaN or infinite
    ├── NonFiniteResultError       the model (with its delta) gave NaN or inf for a structure
    ├── DeltaError                 a delta file or in-memory delta is unusable
    │   ├── DeltaFileError         missing, unreadable, truncated or not a safetensors file
    │   ├── DeltaFormatError       unknown format version or malformed metadata
    │   ├── DeltaMismatchError     made for another base model (fingerprint differs)
    │   ├── DeltaShapeError        names, shapes or indices do not fit the model
    │   ├── DeltaStateError        applied twice, removed out of order or without being applied
    │   └── DeltaValueError        NaN or inf values
    ├── BaseModelError             the base foundation model cannot be loaded
    │   ├── ModelNotFoundError     unknown name, missing file, or offline with no cached copy
    │   ├── UnsafeCheckpointError  checkpoint references code outside the allow-list
    │   ├── ChecksumError          downloaded file does not match the known SHA-256
    │   └── BackendNotInstalledError   optional backend package missing (names the pip extra)
    ├── StructureError             an ASE structure the model cannot evaluate
    │   ├── UnknownElementError    element not known to the base model
    │   ├── AtomsTooCloseError     two atoms closer than 0.1 Å
    │   └── StressUndefinedError   stress asked for a structure whose cell has no volume
    └── DataError                  DFT training data is unusable
        ├── DataFileError          missing or unreadable trajectory file
        ├── EmptyDatasetError      no frames
        ├── MissingLabelError      no energy / forces / stress where required
        ├── NonFiniteLabelError    NaN or inf in a label
        ├── StaleLabelError        calculator results computed for another structure
        └── DuplicateFrameError    the same structure appears twice

Warnings: :class:`UntrainedElementWarning` (a structure holds elements the delta was not
trained on).
"""

from __future__ import annotations

from ase.calculators.calculator import PropertyNotImplementedError


class SparseCalcError(Exception):
    """Base class of all errors raised on purpose by ase_sparsecalc."""


class ConfigError(SparseCalcError, ValueError):
    """An option has a value that is not allowed (unknown device, dtype, method, ...)."""


class OutputFileError(SparseCalcError, OSError):
    """An output file cannot be written (folder missing and not creatable, no permission, disk full)."""


class TrainingDivergedError(SparseCalcError, FloatingPointError):
    """The training loss became NaN or infinite: the run stops at that step (the message says
    which, and suggests a lower learning rate)."""


class PeerStoppedError(SparseCalcError, RuntimeError):
    """Another process of a data-parallel fine-tune stopped (that process's error says why)."""


class CheckpointError(SparseCalcError):
    """A training checkpoint cannot be used to resume (unreadable, or made for other inputs)."""


class NonFiniteResultError(SparseCalcError, FloatingPointError):
    """The model gave a NaN or infinite energy, force or stress; the message names the
    structure, the base model and the delta."""


class DeltaError(SparseCalcError):
    """A delta (file or object) cannot be used."""


class DeltaFileError(DeltaError, OSError):
    """The delta file is missing, unreadable, truncated or not a safetensors file."""


class DeltaFormatError(DeltaError):
    """The delta file's metadata is malformed or has an unknown format version."""


class DeltaMismatchError(DeltaError):
    """The delta was made for a different base model (its fingerprint differs)."""


class DeltaShapeError(DeltaError):
    """A delta tensor does not exist in the model, has another shape, or indices out of range."""


class DeltaStateError(DeltaError, RuntimeError):
    """A delta is applied where it already is, removed where it is not, or removed out of the
    last-in, first-out order of stacked deltas; or a model with deltas applied is copied."""


class DeltaValueError(DeltaError, ValueError):
    """A delta holds NaN or infinite values."""


class BaseModelError(SparseCalcError):
    """The base foundation model cannot be loaded."""


class ModelNotFoundError(BaseModelError, FileNotFoundError):
    """Unknown model name, missing file, or no cached copy while offline."""


class UnsafeCheckpointError(BaseModelError):
    """A checkpoint refers to Python objects outside the loader's allow-list."""


class ChecksumError(BaseModelError):
    """A downloaded model file does not match its known SHA-256 digest."""


class BackendNotInstalledError(BaseModelError, ImportError):
    """An optional backend package is not installed; the message names the pip extra."""


class StructureError(SparseCalcError, ValueError):
    """An ASE ``Atoms`` object that the model cannot evaluate."""


class UnknownElementError(StructureError):
    """The structure holds an element that the base model was not trained on."""


class AtomsTooCloseError(StructureError):
    """Two atoms are closer than the minimum distance (0.1 Å): almost always a broken input."""


class StressUndefinedError(StructureError, PropertyNotImplementedError):
    """Stress was asked for a structure whose cell has no volume (a molecule without a cell)."""


class DataError(SparseCalcError, ValueError):
    """DFT training data is unusable."""


class DataFileError(DataError, OSError):
    """A trajectory file is missing or cannot be read by ASE."""


class EmptyDatasetError(DataError):
    """A trajectory (or index slice) yields no frames."""


class MissingLabelError(DataError):
    """A frame lacks the energy, forces or stress that training needs."""


class NonFiniteLabelError(DataError):
    """A frame's energy, forces or stress holds NaN or inf."""


class StaleLabelError(DataError):
    """A frame's calculator results were computed for another structure: the atoms moved after
    the calculation, or several ``Atoms`` share one calculator that last saw another one."""


class DuplicateFrameError(DataError):
    """The same structure appears more than once in the training data."""


class UntrainedElementWarning(UserWarning):
    """A structure holds elements absent from the delta's training data.

    The delta still changes their energies and forces (foundation models share weights between
    elements), with no fitted energy shift. Silence it with
    ``warnings.filterwarnings("ignore", category=UntrainedElementWarning)``.
    """
