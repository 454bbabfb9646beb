"""Named foundation models: where they come from, where they are cached, their SHA-256.

MACE models are resolved through mace-torch's own URL tables and cache folder
(``$XDG_CACHE_HOME/mace`` or ``~/.cache/mace``), so a file mace has downloaded is found here
and vice versa. SevenNet models ship inside the ``sevenn`` wheel.

A downloaded file is checked against its known SHA-256 digest when one is recorded in
:data:`KNOWN_SHA256`; otherwise the digest seen at first download is pinned in
``ase_sparsecalc_pins.json`` in the cache folder and every later use is checked against it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..delta_io import atomic_write_text
from ..errors import ChecksumError, ModelNotFoundError

logger = logging.getLogger(__name__)

DEFAULT_SEVENNET = "sevennet-0"

# (source table, key) in mace.calculators.foundations_models
_MACE_NAMES: dict[str, tuple[str, str]] = {
    "mace-mp-0-small": ("mp", "small"),
    "mace-mp-0-medium": ("mp", "medium"),
    "mace-mp-0-large": ("mp", "large"),
    "mace-mp-0b3-medium": ("mp", "medium-0b3"),
    "mace-mpa-0-medium": ("mp", "medium-mpa-0"),
    "mace-omat-0-small": ("mp", "small-omat-0"),
    "mace-omat-0-medium": ("mp", "medium-omat-0"),
    "mace-matpes-pbe-0": ("mp", "mace-matpes-pbe-0"),
    "mace-matpes-r2scan-0": ("mp", "mace-matpes-r2scan-0"),
    "mace-off23-small": ("off", "small"),
    "mace-off23-medium": ("off", "medium"),
    "mace-off23-large": ("off", "large"),
    "mace-omol-0-extra-large": ("omol", "extra_large"),
}
# mace-torch keeps the MACE-OMOL address inside ``mace_omol()`` rather than in a table
_MACE_OMOL_URLS = {
    "extra_large": "https://github.com/ACEsuit/mace-foundations/releases/download/mace_omol_0/"
    "MACE-omol-0-extra-large-1024.model",
}
# the head a named multi-head model is used through unless head=... says otherwise (as in
# mace-torch's mace_omol())
_DEFAULT_HEADS = {"mace-omol-0-extra-large": "omol"}
_ALIASES = {
    "mace-mp-0": "mace-mp-0-medium",
    "mace-mpa-0": "mace-mpa-0-medium",
    "mace-omat-0": "mace-omat-0-medium",
    "mace-off23": "mace-off23-medium",
    "mace-omol": "mace-omol-0-extra-large",
    "mace-omol-0": "mace-omol-0-extra-large",
    "7net-0": "sevennet-0",
    "sevennet-0-11jul2024": "sevennet-0",
    "7net-0-22may2024": "sevennet-0-22may2024",
    "7net-l3i5": "sevennet-l3i5",
}
_SEVENNET_NAMES = {
    "sevennet-0": "7net-0_11Jul2024",
    "sevennet-0-22may2024": "7net-0_22May2024",
    "sevennet-l3i5": "7net-l3i5",
}

KNOWN_SHA256: dict[str, str] = {
    # The checkpoints bundled in the sevenn 0.10.4 wheel.
    "sevennet-0": "7052cb42b7b3be42b40b97fa0d21077a48c54b5548948fc4dcf346629f813c36",
    "sevennet-0-22may2024": "5d389fafd512e6ae2830d74d0b66ffc49a55d3832653ff8e7bf7f1343013c1d1",
    "sevennet-l3i5": "a7ff190d41efe5b8317a03d20a468e4036a1a3e64e0b14fdbab64ac3f4bfc09d",
    # MACE files. GitHub publishes no digests for these release assets; each value below is
    # the digest another project records for the same file (its URL is the one mace-torch
    # 0.3.16 downloads), with the place it is recorded. Where several projects record a
    # digest, they agree.
    #
    # github.com/ACEsuit/mace-mp/releases/download/mace_mp_0/2023-12-10-mace-128-L0_energy_epoch-249.model
    # (32,581,838 bytes): ACEsuit/mace, tests/golden/foundation_artifacts.py ("mp_small"), commit 2cae9e2f.
    "mace-mp-0-small": "2ddb079cee0e131eaaf6912ba581b394551ead283e95c99cfe78c605d10b5736",
    # github.com/ACEsuit/mace-mp/releases/download/mace_mp_0/MACE_MPtrj_2022.9.model
    # (133,803,220 bytes): exopoiesis/mlip-vs-dft-iron-sulfides, mlip/environments/README.md,
    # commit 485e66a2.
    "mace-mp-0-large": "f80e992b65ab8f88fdf26964511357c022e92704e4d9bcd086652635a8495b32",
    # github.com/ACEsuit/mace-mp/releases/download/mace_mpa_0/mace-mpa-0-medium.model
    # (79,462,305 bytes; also the copy tracked in the mace git repository): ACEsuit/mace,
    # tests/golden/foundation_artifacts.py ("mpa0_medium"), commit 2cae9e2f; and
    # bonan-group/symmetrix-xl, benchmarks/foundation_model_support_manifest.json, commit 72f1f33e.
    "mace-mpa-0-medium": "75428afe3a1d7d8062e19bcaabd5c433623cabf308242ec9fb493e38604fb638",
    # github.com/ACEsuit/mace-mp/releases/download/mace_mp_0b3/mace-mp-0b3-medium.model
    # (79,472,952 bytes): bonan-group/symmetrix-xl, same manifest.
    "mace-mp-0b3-medium": "2f2be696351ac9e94fbe01cdfb6f017679acdbd2db7645209ef55fec9826b012",
    # github.com/ACEsuit/mace-mp/releases/download/mace_omat_0/mace-omat-0-{small,medium}.model:
    # bonan-group/symmetrix-xl, same manifest.
    "mace-omat-0-small": "0abfde07862cf1e93b8b4d03cb702f29ce9c344ff2fc4de2ec0d7166d6c113a5",
    "mace-omat-0-medium": "d4b14be9afa294eebdbe31a0280b26a0fa29715771e978cbfd3ca24e0d90307a",
    # github.com/ACEsuit/mace-foundations/releases/download/mace_matpes_0/
    # MACE-matpes-{pbe,r2scan}-omat-ft.model: bonan-group/symmetrix-xl, same manifest.
    "mace-matpes-pbe-0": "e618ad582b84239905b9c3b77ce6e9ce111b0ecd1533223a1a6aac7a696b8aa0",
    "mace-matpes-r2scan-0": "8f147ecffa1d06a696e5648b13b81abda9c96fda9d0fb3faba3cd3fb27d9bba9",
    # raw.githubusercontent.com/ACEsuit/mace-off/main/mace_off23/MACE-OFF23_{small,medium,large}.model
    # (main and tag v0.2 hold the same blobs): deepmodeling/deepmd-gnn, deepmd_gnn/mace_off_cli.py,
    # commit 6d8a90fc, and bonan-group/symmetrix-xl, same manifest; "small" also ACEsuit/mace,
    # tests/golden/foundation_artifacts.py ("off_small").
    "mace-off23-small": "165cce4cfec5a34b9c64d4ebf95de15d71106bb584b7291c8470f0749977c46f",
    "mace-off23-medium": "4842c52ad210d6e1f84d6cf1ffa70fae25a7e0d755ed55cf223f43913f587db7",
    "mace-off23-large": "a29e397dbf3e7a24ac50a9b0dfc919bd5a62efa346f5895a6237b0950c1d76f4",
    # No digest for mace-mp-0-medium (2023-12-03-mace-128-L1_epoch-199.model) could be traced to
    # a named source; it, like any model not listed here, is pinned on first use.
}

PINS_FILE = "ase_sparsecalc_pins.json"


@dataclass(frozen=True)
class NamedModel:
    """A foundation model known by name.

    Attributes
    ----------
    name : str
        Canonical name, e.g. ``"mace-mp-0-medium"``.
    backend : str
        ``"mace"`` or ``"sevennet"``.
    url : str or None
        Download address (MACE), None for models shipped in a wheel.
    path : Path
        Where the file is (or will be cached).
    head : str or None
        Output head used unless one is chosen (multi-head models such as MACE-OMOL).
    """

    name: str
    backend: str
    url: str | None
    path: Path
    head: str | None = None


def canonical_name(name: str) -> str:
    """Lower-case canonical model name with aliases resolved."""
    key = name.strip().lower().replace("_", "-")
    return _ALIASES.get(key, key)


def named_models() -> list[str]:
    """All canonical model names this package resolves."""
    return sorted([*_MACE_NAMES, *_SEVENNET_NAMES])


def lookup(name: str) -> NamedModel | None:
    """The :class:`NamedModel` for ``name``, or None if it is not a known name."""
    key = canonical_name(name)
    if key in _SEVENNET_NAMES:
        return NamedModel(key, "sevennet", None, _sevennet_path(key))
    if key in _MACE_NAMES:
        url, path = _mace_url_and_cache(*_MACE_NAMES[key])
        return NamedModel(key, "mace", url, path, _DEFAULT_HEADS.get(key))
    return None


def _sevennet_path(key: str) -> Path:
    from .sevennet import import_sevenn

    import_sevenn()
    from sevenn.util import pretrained_name_to_path

    return Path(pretrained_name_to_path(_SEVENNET_NAMES[key]))


def _mace_url_and_cache(table: str, key: str) -> tuple[str, Path]:
    from ..torch_setup import import_keeping_weights_only

    fm = import_keeping_weights_only("mace.calculators.foundations_models")
    get_cache_dir = import_keeping_weights_only("mace.tools.utils").get_cache_dir

    if table == "mp":
        url = fm.mace_mp_urls[key]
        file_name = "".join(c for c in os.path.basename(url) if c.isalnum() or c in "_")
    else:
        url = fm.mace_off_urls[key] if table == "off" else _MACE_OMOL_URLS[key]
        file_name = os.path.basename(url).split("?")[0]
    if table == "mp" and key == "medium-mpa-0" and os.path.isfile(fm.local_model_path):
        return url, Path(fm.local_model_path)
    return url, Path(get_cache_dir()) / file_name


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(model: NamedModel, timeout: float = 120.0) -> Path:
    """Make sure ``model``'s file is on disk (downloading it if needed) and checks out.

    A download goes to a temporary file next to the cache entry and is checked against the
    known digest before it is renamed into place, so a corrupt or substituted download never
    enters the cache.

    Raises
    ------
    ModelNotFoundError
        Not cached and the download failed (for example offline); says where to put the file.
    ChecksumError
        The file's SHA-256 differs from the known (or pinned) digest.
    """
    if not model.path.is_file():
        if model.url is None:
            raise ModelNotFoundError(f"{model.name}: bundled file {model.path} is missing")
        _download(model, timeout)
    verify(model)
    return model.path


def _download(model: NamedModel, timeout: float) -> None:
    logger.info("downloading %s from %s", model.name, model.url)
    partial: Path | None = None
    try:
        model.path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{model.path.name}.", suffix=".part", dir=model.path.parent)
        partial = Path(name)
        with urllib.request.urlopen(model.url, timeout=timeout) as response, os.fdopen(fd, "wb") as out:
            if "text/html" in response.headers.get("Content-Type", ""):
                raise urllib.error.URLError("server answered with an HTML page, not a model")
            for block in iter(lambda: response.read(1 << 20), b""):
                out.write(block)
            out.flush()
            os.fsync(out.fileno())
        expected = KNOWN_SHA256.get(model.name)
        if expected is not None:
            _compare(partial, sha256_file(partial), expected, model.name, f"download from {model.url}")
        os.replace(partial, model.path)
    except (OSError, urllib.error.URLError) as exc:
        raise ModelNotFoundError(
            f"{model.name}: not in the cache and the download from {model.url} failed ({exc}). "
            f"Download that file on a machine with internet access and put it at {model.path} "
            "(or pass the file's path as base=...)"
        ) from exc
    finally:
        if partial is not None:
            partial.unlink(missing_ok=True)


def _compare(path: Path, digest: str, expected: str, name: str, what: str) -> None:
    if digest != expected:
        raise ChecksumError(
            f"{path}: SHA-256 {digest} of the {what} does not match the expected {expected} for "
            f"{name}; the file is corrupt or not the published model. Delete it and retry."
        )


def verify(model: NamedModel) -> str:
    """Check ``model.path`` against the known or pinned SHA-256; pin it if neither exists."""
    digest = sha256_file(model.path)
    expected = KNOWN_SHA256.get(model.name)
    pins_path = model.path.parent / PINS_FILE
    pins = _read_pins(pins_path)
    if expected is None:
        expected = pins.get(model.name)
    if expected is None:
        pins[model.name] = digest
        try:
            atomic_write_text(pins_path, json.dumps(pins, indent=1, sort_keys=True))
        except OSError:
            logger.warning("could not write %s", pins_path)
        logger.warning(
            "%s: no known SHA-256; pinned %s from %s for later checks", model.name, digest, model.path
        )
        return digest
    _compare(model.path, digest, expected, model.name, "cached file")
    return digest


def _read_pins(path: Path) -> dict[str, str]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
