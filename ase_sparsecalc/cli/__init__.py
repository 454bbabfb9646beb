"""The ``sparsecalc`` command line: thin wrappers that call the library.

Each subcommand lives in its own module of this package and provides ``add_parser(subparsers)``
(which registers the subcommand and sets ``func``). Errors raised on purpose by the library
(:class:`~ase_sparsecalc.errors.SparseCalcError`) and unreadable or unwritable files are printed
in one line, without a traceback, and the command exits with status 2; any other exception is a
bug, reported in one line with exit status 1 (``sparsecalc -v COMMAND ...`` shows its traceback).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import re
import signal
import sys
import warnings
from collections.abc import Sequence

from .._version import __version__
from ..errors import NonFiniteResultError, SparseCalcError, StructureError

SUBCOMMANDS = ("finetune", "eval", "md", "relax", "phonons", "inspect", "export")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="sparsecalc",
        description="Calibrate foundation potentials to your DFT with sparse deltas, and use them.",
    )
    parser.add_argument("--version", action="version", version=f"ase_sparsecalc {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"{__name__}.{name}_cmd")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}_cmd":
                raise
            continue
        module.add_parser(subparsers)
        subparsers.choices[name].add_argument(  # also after the command: sparsecalc finetune ... -v
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,  # absent here: the top-level option's value stands
            help="log progress details (as sparsecalc -v COMMAND)",
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sparsecalc`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s"
    )
    with warnings.catch_warnings():  # restores the usual display when main() returns
        warnings.showwarning = functools.partial(_show_warning, args=args)
        return _run(args)


def _show_warning(message, category, filename, lineno, file=None, line=None, *, args=None) -> None:
    """Show a Python warning as the log shows its messages: one line, without the source line."""
    text = str(message).removeprefix("Warning: ")  # phonopy's own messages start so
    text = _name_input_structure(args, text) if args is not None else text
    print(f"WARNING: {text}", file=sys.stderr if file is None else file)


_STRUCTURE_LABEL = re.compile(r"^structure(?: \d+)? \(([^()]*)\)")
"""How the calculator names a structure it was handed: ``structure (Si2)``, ``structure 0 (Si2)``."""


def _name_input_structure(args: argparse.Namespace, message: str) -> str:
    """``message`` with the calculator's ``structure 0 (Mg2)`` replaced by the structure file the
    command read (``relax``, ``md``, ``phonons``); unchanged for other commands."""
    path = getattr(args, "structure", None)
    if path is None:
        return message
    name = path if getattr(args, "index", -1) == -1 else f"{path} (frame {args.index})"
    return _STRUCTURE_LABEL.sub(lambda found: f"{name} ({found.group(1)})", message, count=1)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a batch scheduler's end of the job, ``kill``), raised where the program is, so that
    it stops as after Ctrl-C: temporary files removed, the last epoch's checkpoint kept."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


def _run(args: argparse.Namespace) -> int:
    """Run the chosen subcommand with SIGTERM turned into :class:`Terminated` meanwhile."""
    try:
        previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread (main() called from a thread): leave SIGTERM alone
        previous_handler = None
    try:
        return _run_command(args)
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)


def _run_command(args: argparse.Namespace) -> int:
    """Run the chosen subcommand; errors become one line on stderr and an exit status."""
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # here, so that a closed pipe is caught below and not at exit
        return status
    except BrokenPipeError:  # the reader of the output stopped early (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as the shell reports a command stopped by a closed pipe
    except SparseCalcError as exc:
        message = str(exc)
        if isinstance(exc, (StructureError, NonFiniteResultError)):
            message = _name_input_structure(args, message)
            path = getattr(args, "structure", None)
            if path is not None and str(path) not in message:
                message = f"{path}: {message}"
        _error_line(args.command, f"error: {message}")
        return 2
    except OSError as exc:  # a file the library hands to another package (ASE, phonopy)
        _error_line(args.command, f"error: {exc}")
        return 2
    except KeyboardInterrupt as exc:
        checkpoint = getattr(args, "checkpoint_file", None)  # set by commands that write one
        resumable = checkpoint is not None and checkpoint.is_file()
        resume = " (--resume continues from the last checkpoint)" if resumable else ""
        if isinstance(exc, Terminated):
            _error_line(args.command, "stopped by SIGTERM" + resume)
            return 128 + signal.SIGTERM
        _error_line(args.command, "interrupted" + resume)
        return 130
    except Exception as exc:
        if args.verbose:
            raise
        _error_line(
            args.command,
            f"internal error: {type(exc).__name__}: {exc} (please report it; rerun as "
            f"'sparsecalc -v {args.command} ...' for the traceback)",
        )
        return 1


def _error_line(command: str, message: str) -> None:
    """Print ``sparsecalc COMMAND: MESSAGE`` on stderr as a single line; under ``torchrun``, where
    every process that meets the error prints it, with the process's rank."""
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    where = f" (rank {rank} of {world})" if world not in ("", "1") else ""
    print(f"sparsecalc {command}{where}: {' '.join(message.split())}", file=sys.stderr)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose base, delta, device and dtype, shared by md, relax, phonons and eval."""
    group = parser.add_argument_group("model")
    group.add_argument("--base", help="named foundation model or model file (default: the delta's base)")
    group.add_argument("--delta", help="delta file (.safetensors); omit for the bare base model")
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    group.add_argument(
        "--dtype", default="float64", choices=["float32", "float64"], help="model dtype (default: float64)"
    )
    group.add_argument("--head", help="output head of a multi-head MACE model")
    group.add_argument("--no-strict", action="store_true", help="apply a delta made for another base")
    group.add_argument(
        "--compile",
        nargs="?",
        const="default",
        metavar="MODE",
        help="evaluate through torch.compile (MODE: default, reduce-overhead, max-autotune, "
        "max-autotune-no-cudagraphs; bare --compile: default). The first step compiles for "
        "minutes: for long runs",
    )
    group.add_argument(
        "--cueq",
        action="store_true",
        help="MACE on a GPU: cuEquivariance kernels (needs the cuda extra; faster from thousands of atoms)",
    )


def make_calculator(args: argparse.Namespace):
    """A :class:`~ase_sparsecalc.SparseCalc` from the options of :func:`add_model_arguments`."""
    from ..calculator import SparseCalc

    return SparseCalc(
        base=args.base,
        delta=args.delta,
        device=args.device,
        default_dtype=args.dtype,
        head=args.head,
        strict=not args.no_strict,
        enable_cueq=args.cueq,
        compile_mode=args.compile,
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
