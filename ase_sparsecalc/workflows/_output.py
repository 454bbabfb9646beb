"""Output files that grow during a run (trajectories, logs), completed by a rename.

A run writes ``.NAME.part`` next to the target and renames it to ``NAME`` when it finishes,
so ``NAME`` only ever holds a complete run. If the run stops early (an error, Ctrl-C), the
``.part`` file is kept (every frame in it is complete) and a warning names it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO

from ase import Atoms

from ..delta_io import refuse_folder
from ..structure_io import output_format

logger = logging.getLogger(__name__)


def part_path(path: Path) -> Path:
    """The temporary name a streamed file is written under."""
    return path.with_name(f".{path.name}.part")


@contextmanager
def streamed_path(path: str | Path | None) -> Iterator[Path | None]:
    """Yield the temporary path for ``path`` (None passes through); rename it on success."""
    if path is None:
        yield None
        return
    path = Path(path)
    refuse_folder(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = part_path(path)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
    except BaseException:
        if tmp.exists():
            logger.warning("run stopped early; what it wrote so far is in %s", tmp)
        raise
    if tmp.exists():
        os.replace(tmp, path)


@contextmanager
def streamed_text(path: str | Path | None) -> Iterator[IO[str] | None]:
    """A line-buffered text handle on the temporary file of ``path`` (None: no file)."""
    with streamed_path(path) as tmp:
        if tmp is None:
            yield None
            return
        with open(tmp, "w", buffering=1, encoding="utf-8") as handle:
            yield handle


class FrameWriter:
    """Appends frames to a trajectory file whose format comes from its name.

    ``.traj`` goes through :class:`ase.io.Trajectory`; other multi-frame formats (``.extxyz``,
    ``.xyz``) are appended with :func:`ase.io.write`. Calculator results (energy, forces,
    stress) attached to the atoms are written with each frame.
    """

    def __init__(self, path: Path, stack: ExitStack, final_name: Path) -> None:
        from ase.io import Trajectory

        self.format = trajectory_format(final_name)
        if self.format == "traj":
            self._traj = stack.enter_context(Trajectory(str(path), "w"))
            self._handle = None
        else:
            self._traj = None
            self._handle = stack.enter_context(open(path, "w", encoding="utf-8"))  # noqa: SIM115

    def write(self, atoms: Atoms) -> None:
        """Append one frame."""
        if self._traj is not None:
            self._traj.write(atoms)
        else:
            from ase.io import write

            write(self._handle, atoms, format=self.format)
            self._handle.flush()


def trajectory_format(path: str | Path) -> str:
    """The ASE format of a trajectory file named ``path``, refused unless frames can be appended
    to it one at a time: ``.traj`` or a multi-frame text format (``.extxyz``, ``.xyz``, ...).

    Raises
    ------
    DataFileError
        A single-frame format (``.vasp``, ``.json`` of one structure...) or a binary one other than
        ``.traj`` (``.cif`` is written as bytes by ASE, one data block per call).
    """
    from ase.io.formats import ioformats

    from ..errors import DataFileError

    name = output_format(path)
    info = ioformats[name]
    if info.single:
        raise DataFileError(
            f"{path}: the {name!r} format holds one frame; use .traj or .extxyz for a trajectory"
        )
    if info.isbinary and name != "traj":
        raise DataFileError(
            f"{path}: the {name!r} format cannot be written one frame at a time; use .traj or .extxyz "
            f"for a trajectory (ase convert turns either into {name!r} afterwards)"
        )
    return name


@contextmanager
def streamed_frames(path: str | Path | None) -> Iterator[FrameWriter | None]:
    """A :class:`FrameWriter` on the temporary file of ``path`` (None: no trajectory)."""
    if path is None:
        yield None
        return
    refuse_folder(Path(path))
    trajectory_format(path)  # fail before the run, not after it
    with streamed_path(path) as tmp, ExitStack() as stack:
        yield FrameWriter(tmp, stack, Path(path))
