"""What a file looks like from its first bytes, for errors about a file given in the wrong place.

A model file given as a delta, a delta given as a model, or a structure file given as either
fails deep inside safetensors or torch with a message about headers or zip records. These
helpers name what the file is instead, without reading more than its first bytes.
"""

from __future__ import annotations

import struct
from pathlib import Path

SNIFF_BYTES = 4096
"""Bytes read to tell the kinds apart."""

MAX_SAFETENSORS_HEADER = 100_000_000
"""The largest JSON header (bytes) safetensors accepts."""


def describe_as_delta_misplaced(path: str | Path) -> str:
    """``"; it is ..."`` saying what a file that is not a delta holds, or ``""`` if unknown."""
    head = _head(path)
    kind = _kind(head)
    if kind == "zip":
        return "; it is a zip archive, as PyTorch saves models: a base model goes to --base (base=)"
    if kind == "pickle":
        return "; it is a Python pickle (an older PyTorch file?), not a delta"
    return _as_text(head, kind)


def describe_as_model_misplaced(path: str | Path) -> str:
    """``"; it is ..."`` saying what a file that is not a torch model holds, or ``""``."""
    head = _head(path)
    kind = _kind(head)
    if kind == "safetensors":
        return "; it is a safetensors file: a delta goes to --delta (delta=), beside its base"
    return _as_text(head, kind)


def _head(path: str | Path) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read(SNIFF_BYTES)
    except OSError:
        return b""


def _kind(head: bytes) -> str | None:
    """``"zip"`` (PyTorch's format for models and checkpoints), ``"pickle"``, ``"safetensors"``,
    ``"text"`` or None (unknown, empty or unreadable), from a file's first bytes."""
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:  # pickle protocol 2 to 5
        return "pickle"
    if len(head) > 9 and head[8:9] == b"{":  # safetensors: 8-byte header size, JSON header
        (size,) = struct.unpack("<Q", head[:8])
        if 2 <= size < MAX_SAFETENSORS_HEADER:
            return "safetensors"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    printable = sum(ch.isprintable() or ch in "\n\r\t" for ch in text)
    return "text" if text and printable >= 0.95 * len(text) else None


def _as_text(head: bytes, kind: str | None, width: int = 40) -> str:
    """``"; it is a text file ... beginning '...'"`` for a text file, else ``""``."""
    if kind != "text":
        return ""
    first = head.decode("utf-8").splitlines()[0][:width]
    return f"; it is a text file (a structure or data file?) beginning {first!r}"
