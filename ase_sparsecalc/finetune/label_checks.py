"""Sanity checks of DFT labels against the base model, before any training.

A foundation model is wrong in the details but right in scale: its forces correlate with DFT
forces with a slope near one (about 1.1 for SevenNet-0 on ethanol). Labels in the wrong unit or
convention show up as a slope far from one: forces in Hartree/Bohr as about 0.02, in kcal/mol/Å
as about 23; energies per atom instead of per structure as about 1/N; stresses in the
pressure-positive convention as about -1. Nothing here refuses data (a base model can be far
off for exotic chemistry); it warns, names the likely cause, and the report keeps the slopes.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence

import numpy as np
from ase.data import chemical_symbols
from ase.stress import full_3x3_to_voigt_6_stress
from ase.units import GPa

from ..graph import charge_and_spin
from .data import Frame
from .dataset import composition_matrix
from .metrics import VOIGT_NAMES

logger = logging.getLogger(__name__)

PLAUSIBLE_SLOPE = (0.25, 4.0)
"""Label / base-model slopes outside this range trigger a warning. A base model much softer
than the DFT for the material raises them without any unit error: SevenNet-0 on GPAW PBE
ferromagnetic bcc Fe (bulk modulus 92 against 183 GPa) gives 3.2 for forces, 2.7 for energies
and 2.2 for stresses; the bundled data give 0.73-1.37."""

PLURALS = {"forces": "forces", "energy": "energies", "stress": "stresses"}

MIN_SPREAD = {"forces": 1e-3, "energy": 1e-4, "stress": 1e-5}
"""Least RMS of the base model's values (eV/Å, eV/atom, eV/Å³) for a slope to mean anything."""


def label_slopes(frames: Sequence[Frame], predictions: Mapping[int, Mapping[str, np.ndarray]]) -> dict:
    """Least-squares slopes (through zero) of DFT labels against the base model's predictions.

    Energies are compared after removing what per-element shifts can explain (their projection
    on the composition matrix), per atom. Stresses are compared after removing each set's mean
    pressure: a functional moves the pressure at a given geometry by a few GPa, and data at
    the DFT's own equilibrium (stresses near zero) against a base model with such an offset
    would otherwise give a slope near zero. Returns ``{"forces": s, "energy": s, "stress": s}``
    for the quantities with enough labelled spread.
    """
    slopes: dict[str, float] = {}
    for name in ("forces", "stress"):
        chosen = [k for k, f in enumerate(frames) if getattr(f, name) is not None and name in predictions[k]]
        if chosen:
            if name == "stress":  # (n, 3, 3) each
                labels = _without_mean_pressure(np.array([frames[k].stress for k in chosen])).ravel()
                model = _without_mean_pressure(np.array([predictions[k]["stress"] for k in chosen])).ravel()
            else:
                labels = np.concatenate([np.ravel(frames[k].forces) for k in chosen])
                model = np.concatenate([np.ravel(predictions[k]["forces"]) for k in chosen])
            slopes.update(_slope(name, labels, model))
    if len(frames) >= 3:
        elements = sorted({int(z) for f in frames for z in f.atoms.numbers})
        counts = composition_matrix(frames, elements)
        n_atoms = counts.sum(axis=1)
        dft = np.array([f.energy for f in frames])
        base = np.array([predictions[k]["energy"] for k in range(len(frames))])
        slopes.update(
            _slope(
                "energy",
                _beyond_composition(counts, dft) / n_atoms,
                _beyond_composition(counts, base) / n_atoms,
            )
        )
    return slopes


def _without_mean_pressure(stresses: np.ndarray) -> np.ndarray:
    """(n, 3, 3) stresses less the mean over the frames of their isotropic part."""
    mean_pressure = np.trace(stresses, axis1=1, axis2=2).mean() / 3.0
    return stresses - mean_pressure * np.eye(3)


def _beyond_composition(counts: np.ndarray, energies: np.ndarray) -> np.ndarray:
    """What of ``energies`` (n_frames,) no per-element sum explains: the least-squares residual."""
    coefficients = np.linalg.lstsq(counts, energies, rcond=None)[0]
    return energies - counts @ coefficients


MIN_ALIGNMENT = 0.5
"""Least |cosine| between the DFT labels and the base model's values (both as vectors) for
their slope to be taken: a unit or sign error scales the labels and keeps the cosine near one,
while labels the base model does not follow (an equation of state spanning a few meV, with the
model's minimum elsewhere) give a slope that says nothing about units."""


def _slope(name: str, labels: np.ndarray, model: np.ndarray) -> dict[str, float]:
    spread = float(np.sqrt(np.mean(model**2))) if model.size else 0.0
    if spread < MIN_SPREAD[name]:
        return {}
    norms = float(np.linalg.norm(labels) * np.linalg.norm(model))
    if norms == 0.0 or abs(float(labels @ model)) < MIN_ALIGNMENT * norms:
        return {}
    return {name: float(labels @ model / (model @ model))}


def warn_about_label_scales(slopes: Mapping[str, float], source: str) -> list[str]:
    """Log a warning for every slope outside :data:`PLAUSIBLE_SLOPE`; returns the messages."""
    hints = {
        "forces": "forces in Hartree/Bohr give about 0.02, in kcal/mol/Å about 23",
        "energy": "energies per atom instead of per structure give about 1/(number of atoms), "
        "Hartree about 0.04, kcal/mol about 23",
        "stress": "the pressure-positive sign convention gives about -1, kbar about 1600, GPa about 160",
    }
    low, high = PLAUSIBLE_SLOPE
    messages = []
    for name, slope in slopes.items():
        if not low <= slope <= high:
            messages.append(
                f"{source}: the DFT {PLURALS[name]} are {slope:.3g} times the base model's (least squares; "
                f"expected near 1, or up to about 3 from a base model much softer than the DFT, as "
                f"SevenNet-0 for ferromagnetic bcc Fe); check their units and sign ({hints[name]})"
            )
    for message in messages:
        logger.warning(message)
    return messages


def warn_if_energies_per_atom_of_one_size(frames: Sequence[Frame], slopes: Mapping[str, float]) -> str | None:
    """Warn when every frame has N atoms and the energy slope is about the force slope / N.

    Energies per atom instead of per structure give an energy slope of 1/N: far outside
    :data:`PLAUSIBLE_SLOPE` for large cells, but inside it for the primitive cells of most
    crystals (N = 2 to 4), where the force slope, untouched by the mistake, gives it away.
    Returns the message, or None.
    """
    sizes = {len(f.atoms) for f in frames}
    if len(sizes) != 1 or "energy" not in slopes or not slopes.get("forces", 0.0) > 0.0:
        return None
    n_atoms = sizes.pop()
    ratio = slopes["energy"] / slopes["forces"]
    if n_atoms < 2 or ratio > 0.75 or abs(ratio * n_atoms - 1.0) > 0.25:
        return None
    message = (
        f"the DFT energies of {_describe_frames(frames)}, all of {n_atoms} atoms, follow the base "
        f"model's with a slope of {slopes['energy']:.3g} where the forces follow with "
        f"{slopes['forces']:.3g}: about 1/{n_atoms} of it, as energies per atom instead of per "
        "structure give; give the total energy of each structure"
    )
    logger.warning(message)
    return message


STRAY_ENERGY = 0.5
"""eV/atom: a frame whose DFT energy differs from the base model's by more than this, beyond
what per-element shifts explain, is reported (functionals differ by tens of meV/atom there)."""

NET_FORCE = 0.1
"""eV/Å: a frame whose DFT forces sum to more than this per atom is reported."""

STRAY_STRESS = 0.3
"""eV/Å³ (about 48 GPa): a frame whose DFT stress differs from the base model's by more than
this in any component is reported. Foundation models miss stress by a few GPa at most on
structures they describe at all; a frame in GPa or kbar read as eV/Å³ is 160 or 1600 times
too large."""


def warn_about_stray_energies(
    frames: Sequence[Frame], predictions: Mapping[int, Mapping[str, np.ndarray]], most: int = 3
) -> str | None:
    """Warn about frames whose energy no per-element shift brings near the base model's.

    The least-squares per-element shifts of (DFT - base) explain a change of functional or
    pseudopotentials to within tens of meV/atom. A frame left more than :data:`STRAY_ENERGY`
    eV/atom away holds an energy of another kind: per atom instead of per structure (in a set of
    mixed sizes, where the slope test of :func:`label_slopes` cannot see it), another unit, or
    another DFT setup. Returns the message (naming the worst ``most`` frames), or None.
    """
    if len(frames) < 2:
        return None
    elements = sorted({int(z) for f in frames for z in f.atoms.numbers})
    counts = composition_matrix(frames, elements)
    n_atoms = counts.sum(axis=1)
    base = np.array([predictions[k]["energy"] for k in range(len(frames))])
    labels = np.array([f.energy for f in frames])
    per_structure = _rms(_beyond_composition(counts, labels - base) / n_atoms)
    per_atom = _rms(_beyond_composition(counts, labels * n_atoms - base) / n_atoms)
    if per_structure > 0.05 and per_atom < 0.3 * per_structure:
        message = (
            f"the DFT energies of {_describe_frames(frames)} look like energies per atom: read as "
            f"energies per structure they stray {per_structure:.3g} eV/atom (RMS) from the base "
            f"model's beyond per-element shifts, multiplied by the number of atoms {per_atom:.3g}; "
            "give the total energy of each structure"
        )
        logger.warning(message)
        return message
    gap = labels - base
    fitted = np.ones(len(frames), dtype=bool)  # shifts fitted to the frames that are not stray
    for _ in range(5):  # least squares alone would spread one stray frame's error over all
        coefficients = np.linalg.lstsq(counts[fitted], gap[fitted], rcond=None)[0]
        stray = (gap - counts @ coefficients) / n_atoms
        within = np.abs(stray) <= STRAY_ENERGY
        if not within.any() or np.array_equal(within, fitted):
            break
        fitted = within
    return _warn_about_frames_beyond(
        frames,
        stray,
        STRAY_ENERGY,
        "{:+.3g} eV/atom",
        most,
        f"{{count}} frame(s) have DFT energies that per-element shifts leave more than "
        f"{STRAY_ENERGY} eV/atom from the base model's ({{listed}}): check for energies per atom "
        "instead of per structure, another unit, or frames from another DFT setup",
    )


def _warn_about_frames_beyond(
    frames: Sequence[Frame], values: np.ndarray, limit: float, form: str, most: int, template: str
) -> str | None:
    """Log and return ``template`` filled with how many frames have ``|value| > limit``
    (``{count}``) and the worst ``most`` of them, named with their value in ``form``
    (``{listed}``); None when no frame is beyond the limit."""
    beyond = np.abs(values) > limit
    if not beyond.any():
        return None
    worst = [k for k in np.argsort(-np.abs(values)) if beyond[k]][:most]
    listed = "; ".join(f"{frames[k].source}: {form.format(values[k])}" for k in worst)
    message = template.format(count=int(beyond.sum()), listed=listed)
    logger.warning(message)
    return message


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(values**2)))


def _describe_frames(frames: Sequence[Frame]) -> str:
    """``"the N frames (a.xyz, b.xyz)"``: how many frames, and the files they come from."""
    files = list(dict.fromkeys(f.source.rsplit(":frame ", 1)[0] for f in frames))
    shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    return f"the {len(frames)} frames ({shown})"


def warn_about_net_forces(frames: Sequence[Frame], most: int = 3) -> str | None:
    """Warn about frames whose DFT forces do not sum to (nearly) zero.

    A model's forces are minus the gradient of an energy that does not change when the
    structure moves as a whole, so they sum to zero; DFT's do to within the integration grid's
    error (hundredths of eV/Å per atom at most). A sum of more than :data:`NET_FORCE` eV/Å per
    atom is an error no fine-tuning can fit: forces of another structure, a broken file, a
    constant added to them. Returns the message (naming the worst ``most`` frames), or None.
    """
    net = np.array(
        [np.linalg.norm(f.forces.sum(axis=0)) / len(f.atoms) if f.forces is not None else 0.0 for f in frames]
    )
    return _warn_about_frames_beyond(
        frames,
        net,
        NET_FORCE,
        "{:.3g} eV/Å per atom",
        most,
        f"{{count}} frame(s) have DFT forces whose sum is more than {NET_FORCE} eV/Å per "
        "atom ({listed}); forces of an energy sum to zero, so no model can fit these: check that "
        "forces and positions belong to the same structure",
    )


def _stress_gaps(
    frames: Sequence[Frame], predictions: Mapping[int, Mapping[str, np.ndarray]]
) -> list[tuple[int, np.ndarray]]:
    """(frame index, DFT - base stress (3, 3) in eV/Å³) for every frame where both exist."""
    return [
        (k, f.stress - predictions[k]["stress"])
        for k, f in enumerate(frames)
        if f.stress is not None and "stress" in predictions[k]
    ]


def warn_about_stray_stresses(
    frames: Sequence[Frame], predictions: Mapping[int, Mapping[str, np.ndarray]], most: int = 3
) -> str | None:
    """Warn about frames whose DFT stress is far from the base model's.

    The slope test of :func:`label_slopes` sees a unit error only when it spoils the whole set;
    one frame in GPa among frames in eV/Å³ (files from two programs, say) barely moves it.
    Frames with a component more than :data:`STRAY_STRESS` eV/Å³ from the base model's are
    named. Returns the message (naming the worst ``most`` frames), or None.
    """
    gap = np.zeros(len(frames))
    for k, difference in _stress_gaps(frames, predictions):
        gap[k] = np.abs(difference).max()
    return _warn_about_frames_beyond(
        frames,
        gap,
        STRAY_STRESS,
        "{:.3g} eV/Å³",
        most,
        f"{{count}} frame(s) have a DFT stress component more than {STRAY_STRESS} eV/Å³ "
        f"({STRAY_STRESS / GPa:.0f} GPa) from the base model's ({{listed}}): check the unit "
        "(eV/Å³ expected; GPa and kbar read as eV/Å³ are 160 and 1600 times too large) and the sign",
    )


SHEAR_NAMES = VOIGT_NAMES[3:]
"""The shear components in ASE's Voigt order (xx, yy, zz, yz, xz, xy)."""

MIN_SHEAR = 0.1 * GPa
"""eV/Å³: least RMS of the base model's shear stresses for their order to be judged."""


MIN_SHEAR_FRAMES = 6
"""Least number of frames with stresses for the order of their shear components to be judged."""


def warn_if_shear_order_differs(
    frames: Sequence[Frame], predictions: Mapping[int, Mapping[str, np.ndarray]]
) -> str | None:
    """Warn when the DFT shear stresses match the base model's better in another order or sign.

    Stresses written as six numbers in another program's Voigt order (VASP's is xx yy zz xy yz
    zx; ASE's xx yy zz yz xz xy) and read in ASE's keep their diagonal, so the slope test of
    :func:`label_slopes` passes, but their shear components land in the wrong places; shear
    components of the opposite sign (a convention mixed up for the off-diagonal part only) pass
    it too. A fine-tune then learns wrong shear stresses. Over the frames with both stresses, the
    correlation of the DFT shear components (yz, xz, xy) with the base model's is compared with
    that of the base model's components in each other order, each with either sign; a warning
    names one that correlates better by more than 0.3 (and above 0.5). Skipped with fewer than
    :data:`MIN_SHEAR_FRAMES` frames, or when the base model's shear stresses have an RMS under
    :data:`MIN_SHEAR` (cubic cells near equilibrium, say). Returns the message, or None.
    """
    chosen = [k for k, f in enumerate(frames) if f.stress is not None and "stress" in predictions[k]]
    if len(chosen) < MIN_SHEAR_FRAMES:
        return None
    labels = full_3x3_to_voigt_6_stress(np.array([frames[k].stress for k in chosen]))[:, 3:]  # (n, 3)
    model = full_3x3_to_voigt_6_stress(np.array([predictions[k]["stress"] for k in chosen]))[:, 3:]
    if _rms(model) < MIN_SHEAR or _rms(labels) == 0.0:
        return None

    def correlation(order: tuple[int, ...], sign: float) -> float:
        other = sign * model[:, list(order)]
        return float(np.sum(labels * other) / (np.linalg.norm(labels) * np.linalg.norm(other)))

    stated = correlation((0, 1, 2), 1.0)
    others = {
        (order, sign): correlation(order, sign)
        for order in itertools.permutations(range(3))
        for sign in (1.0, -1.0)
        if (order, sign) != ((0, 1, 2), 1.0)
    }
    (order, sign), best = max(others.items(), key=lambda item: item[1])
    if best < 0.5 or best - stated < 0.3:
        return None
    if order == (0, 1, 2):
        what = "the opposite sign (of the shear components only: the diagonal's sign is right)"
    else:
        read_as = " ".join(("-" if sign < 0 else "") + SHEAR_NAMES[i] for i in order)
        vasp = " (VASP's order: xy yz zx)" if (order, sign) == ((2, 0, 1), 1.0) else ""
        what = f"the order {read_as}{vasp}"
    message = (
        f"the DFT shear stresses of {_describe_frames([frames[k] for k in chosen])} correlate with "
        f"the base model's at {stated:+.2f} as read (ASE's Voigt order xx yy zz yz xz xy), but at "
        f"{best:+.2f} with {what}. Six-number stresses must be in ASE's order and sign "
        "(positive under tension); write the stress as a 3x3 matrix, or fix the order or sign"
    )
    logger.warning(message)
    return message


STRESS_OFFSET = 0.2
"""eV/Å³ (about 32 GPa): an isotropic stress this large, the same in every frame, between the
DFT and the base model's stresses is reported. A change of functional moves the pressure at a
given geometry by a few GPa, up to about 15 GPa in the stiffest solids (LDA against PBE for
diamond: 1 % in the lattice constant at a bulk modulus of 440 GPa; 10 GPa for MgO); Pulay
stress from a plane-wave cutoff far too low for stresses is tens of GPa or more."""


def warn_about_stress_offset(
    frames: Sequence[Frame], predictions: Mapping[int, Mapping[str, np.ndarray]]
) -> str | None:
    """Warn when the DFT stresses differ from the base model's by one constant pressure.

    The classic cause is Pulay stress: with a plane-wave cutoff converged for energies but not
    for stresses, every frame carries nearly the same spurious isotropic stress, which a fine-tune
    would learn as physics. Reported when the median isotropic part of (DFT - base) exceeds
    :data:`STRESS_OFFSET` and explains most of the difference (what remains, RMS over frames and
    components, is under a quarter of it). Returns the message, or None.
    """
    pairs = _stress_gaps(frames, predictions)
    if not pairs:
        return None
    gaps = np.array([gap for _, gap in pairs])  # (n_frames, 3, 3), eV/Å³
    offset = float(np.median(np.trace(gaps, axis1=1, axis2=2) / 3.0))
    remainder = _rms(gaps - offset * np.eye(3))
    if abs(offset) <= STRESS_OFFSET or remainder > 0.25 * abs(offset):
        return None
    message = (
        f"the DFT stresses of {_describe_frames([frames[k] for k, _ in pairs])} differ from the base "
        f"model's by one isotropic stress of {offset:+.3g} eV/Å³ ({offset / GPa:+.0f} GPa), nearly "
        f"the same in every frame ({remainder / GPa:.1f} GPa RMS beyond it). A change of functional "
        "moves the pressure by a few GPa (15 at most in the stiffest solids); a constant this large "
        "is usually Pulay stress (a plane-wave cutoff converged for energies but not for stresses: "
        "raise it, or use the DFT code's Pulay correction) or an external pressure added to the "
        "stress. Fix the data, or train without stresses (stress_weight=0, --stress-weight 0)"
    )
    logger.warning(message)
    return message


PRESSURE_MISMATCH = 2.0 * GPa
"""eV/Å³: a gap this large between the pressure the DFT stresses give and the one the DFT
energies give (their change with volume) is reported. Converged data agree to a few tenths of
a GPa (GPAW Al and Si equations of state: 0.0 GPa); Pulay stress from a cutoff converged for
energies only is several GPa (GPAW, PBE: MgO at 500 eV 18.9 GPa, ferromagnetic bcc Fe at 450 eV
4.4 GPa, hcp Mg at 350 eV 2.7 GPa)."""

MIN_VOLUME_SPREAD = 0.02
"""Least spread of volumes, (max - min) / mean, over frames of one composition for the slope of
their energies against volume to be taken."""

MIN_PRESSURE_FRAMES = 5
"""Least number of frames of one composition, with energies and stresses, for that slope."""

PRESSURE_FIT_DEGREE = 3
"""Highest power of the volume in the fit of the pressure gap against volume, whose work is
taken out of the energy gaps (lowered to leave each coefficient a frame or more to spare)."""


def warn_if_stresses_disagree_with_energies(
    frames: Sequence[Frame], predictions: Mapping[int, Mapping[str, np.ndarray]]
) -> str | None:
    r"""Warn when the DFT stresses do not match the derivative of the DFT energies with volume.

    For a periodic structure :math:`P = -\partial E / \partial V`, and a conservative base model
    obeys it exactly, so the differences (DFT - base) must obey it too: among frames of one
    composition at several volumes, the energy difference changes by the work of the stress
    difference. A Pulay stress (a plane-wave cutoff converged for energies but not for stresses)
    breaks this by its own size, and a fine-tune then fits both labels halfway.

    Per composition and cell shape (at least :data:`MIN_PRESSURE_FRAMES` frames whose volumes
    spread by :data:`MIN_VOLUME_SPREAD`), the pressure difference is fitted as a polynomial in
    volume (:data:`PRESSURE_FIT_DEGREE`), and its work, with that of the mean shear-stress
    difference, is taken out of the energy differences; what is left grows linearly with volume
    by the pressure the stresses carry beyond the energies. Taking out the work of the fitted
    pressure, not of its mean, keeps a base model much softer or stiffer than the DFT (whose
    energy difference then curves with volume) from hiding the gap in the scatter. A gap above
    :data:`PRESSURE_MISMATCH` and four standard errors is reported. Returns the message, or None.
    """
    compositions: dict[tuple, list[int]] = {}
    for k, frame in enumerate(frames):
        if frame.stress is None or "stress" not in predictions[k] or not frame.atoms.pbc.all():
            continue
        compositions.setdefault(tuple(sorted(frame.atoms.symbols.formula.count().items())), []).append(k)
    found = []  # (gap eV/Å³, pressure from stresses, pressure from energies, frame indices)
    for members in (group for same in compositions.values() for group in _by_cell_shape(frames, same)):
        volumes = np.array([frames[k].atoms.get_volume() for k in members])
        if len(members) < MIN_PRESSURE_FRAMES or np.ptp(volumes) < MIN_VOLUME_SPREAD * volumes.mean():
            continue
        stress_gaps = np.array([frames[k].stress - predictions[k]["stress"] for k in members])
        pressure_gaps = -np.trace(stress_gaps, axis1=1, axis2=2) / 3.0
        centred = volumes - volumes.mean()
        design = np.stack([np.ones_like(centred), centred], axis=1)
        degree = min(PRESSURE_FIT_DEGREE, len(members) - 3)  # a frame or more to spare per coefficient
        powers = np.stack([centred**j for j in range(degree + 1)], axis=1)
        pressure_fit, *_ = np.linalg.lstsq(powers, pressure_gaps, rcond=None)
        pressure_work = -sum(c * centred ** (j + 1) / (j + 1) for j, c in enumerate(pressure_fit))
        mean_pressure = float(pressure_gaps.mean())
        # the shear part of the mean stress gap does work under anisotropic strains (an elastic-
        # constant series strains one axis at a time); take that work out of the energy gaps too
        shear_gap = stress_gaps.mean(axis=0) + mean_pressure * np.eye(3)
        nearest = int(np.argmin(np.abs(volumes - np.median(volumes))))
        reference = frames[members[nearest]]
        shear_work = [
            volumes[nearest] * float(np.sum(shear_gap * _strain(reference, frames[k]))) for k in members
        ]
        energy_gaps = np.array([frames[k].energy - float(predictions[k]["energy"]) for k in members])
        left = energy_gaps - pressure_work - np.array(shear_work)
        (_, gap), *_ = np.linalg.lstsq(design, left, rcond=None)
        residual = left - design @ np.array([left.mean(), gap])
        gap_error = np.sqrt(residual @ residual / (len(members) - 2) / (centred @ centred))
        from_stresses, from_energies = mean_pressure, mean_pressure - float(gap)
        if abs(gap) > PRESSURE_MISMATCH and abs(gap) > 4.0 * gap_error:
            found.append((float(gap), from_stresses, from_energies, members))
    if not found:
        return None
    gap, from_stresses, from_energies, members = max(found, key=lambda item: abs(item[0]))
    message = (
        f"{frames[members[0]].atoms.get_chemical_formula()}: the DFT stresses of "
        f"{_describe_frames([frames[k] for k in members])} disagree with their energies: relative to "
        f"the base model, the stresses give a pressure of {from_stresses / GPa:+.1f} GPa, the change of the "
        f"energies with volume {from_energies / GPa:+.1f} GPa, {abs(gap) / GPa:.1f} GPa apart (P = -dE/dV "
        "holds for consistent labels to a few tenths of a GPa). This is usually Pulay stress (a "
        "plane-wave cutoff converged for energies but not for stresses: raise it, or use the DFT "
        "code's Pulay correction); a fine-tune fits the two labels halfway. Fix the data, or train "
        "on one of them (--stress-weight 0, or --energy-weight 0)"
    )
    logger.warning(message)
    return message


SLAB_STRESS_MISMATCH = 0.1 * GPa
"""eV/Å³: a mean gap this large in the stress across the vacuum of slab frames, beyond what their
forces give, is reported. The stress there is over the whole cell, vacuum included, so a small
number moves the in-plane lattice constant a lot: GPAW PBE MoS2 monolayers at 400 eV (16 Å of
vacuum) carry 0.22 ± 0.01 GPa, which moves the zero-stress lattice constant by 0.26 %."""

SLAB_VACUUM = 6.0
"""Å: a gap between atomic planes wider than this along a cell vector is vacuum, across which
neither DFT nor the base model interacts (the workflows' vacuum warning uses the same width)."""

MIN_SLAB_FRAMES = 3
"""Least number of slab frames, with forces and stresses, for the comparison."""


def warn_if_slab_stresses_disagree_with_forces(frames: Sequence[Frame]) -> str | None:
    r"""Warn when the DFT stress across a slab's vacuum does not follow from the DFT forces.

    With vacuum along a cell vector, nothing interacts across it, and a strain that only moves
    atoms along the vacuum's normal :math:`\hat n` changes the energy through the atoms alone:
    :math:`\sigma \hat n = -\frac{1}{V} \sum_i F_i h_i`, with :math:`h_i` the height of atom
    *i* along :math:`\hat n` (the slab kept whole) and *V* the cell volume, vacuum included. This
    holds for any converged DFT and exactly for the base model. A plane-wave basis that is not
    converged for stresses adds its Pulay stress, isotropic, so the normal component
    :math:`\hat n^T \sigma \hat n` shows it with the size it also has in the in-plane
    components, where a fine-tune would learn it as a change of the lattice constant. A mean
    gap above :data:`SLAB_STRESS_MISMATCH` and four standard errors, over at least
    :data:`MIN_SLAB_FRAMES` frames with a vacuum wider than :data:`SLAB_VACUUM`, is reported.
    Returns the message, or None.
    """
    from ..workflows._periodicity import heights_above_widest_gap, widest_gaps

    gaps, sources = [], []
    for frame in frames:
        atoms = frame.atoms
        if frame.stress is None or frame.forces is None:
            continue
        widths = widest_gaps(atoms)
        if widths.max() <= SLAB_VACUUM:
            continue
        k = int(np.argmax(widths))
        cell = atoms.cell.array
        normal = np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3])
        normal /= np.linalg.norm(normal)
        heights = heights_above_widest_gap(atoms, k) * float(cell[k] @ normal)  # Å, slab kept whole
        from_forces = -(frame.forces * heights[:, None]).sum(axis=0) / atoms.get_volume()
        gaps.append(float(normal @ frame.stress @ normal - normal @ from_forces))
        sources.append(frame)
    if len(gaps) < MIN_SLAB_FRAMES:
        return None
    mean, error = float(np.mean(gaps)), float(np.std(gaps, ddof=1) / np.sqrt(len(gaps)))
    if abs(mean) <= SLAB_STRESS_MISMATCH or abs(mean) <= 4.0 * error:
        return None
    message = (
        f"the DFT stresses of {_describe_frames(sources)} (slabs: more than {SLAB_VACUUM:.0f} Å of "
        f"vacuum) disagree with their forces across the vacuum: with nothing interacting across it, "
        f"the stress normal to the vacuum follows from the forces (σ n = -Σ F h / V), but the DFT "
        f"stresses carry {mean / GPa:+.2f} GPa more there (± {error / GPa:.1g}). This is usually Pulay "
        "stress (a plane-wave cutoff converged for energies but not for stresses), which is "
        "isotropic: it is in the in-plane stresses too, and a fine-tune learns it as a change of "
        "the in-plane lattice constant. Raise the cutoff, subtract it from the stresses, or train "
        "without them (--stress-weight 0)"
    )
    logger.warning(message)
    return message


def _strain(reference: Frame, frame: Frame) -> np.ndarray:
    """Green-Lagrange strain (3, 3) that takes ``reference``'s cell to ``frame``'s, in the
    reference's Cartesian axes (cells as rows: :math:`E = (C_0^{-1} C C^T C_0^{-T} - 1) / 2`)."""
    inverse = np.linalg.inv(reference.atoms.cell.array)
    cell = frame.atoms.cell.array
    return 0.5 * (inverse @ cell @ cell.T @ inverse.T - np.eye(3))


CELL_SHAPE_TOLERANCE = 0.15
"""Frames whose cell shapes (metric tensors at unit volume) differ by more than this in any
entry are taken as different structures (phases) by :func:`_by_cell_shape`."""


def _by_cell_shape(frames: Sequence[Frame], members: Sequence[int]) -> list[list[int]]:
    """``members`` in groups of one cell shape, so that the energies of different phases of one
    composition (whose model errors differ) are not fitted as one curve against volume."""
    groups: list[tuple[np.ndarray, list[int]]] = []
    for k in members:
        atoms = frames[k].atoms
        shape = atoms.cell.array @ atoms.cell.array.T / atoms.get_volume() ** (2.0 / 3.0)
        for reference, group in groups:
            if np.abs(shape - reference).max() <= CELL_SHAPE_TOLERANCE:
                group.append(k)
                break
        else:
            groups.append((shape, [k]))
    return [group for _, group in groups]


def warn_if_shifts_underdetermined(
    frames: Sequence[Frame], isolated: Mapping[str, float] | None
) -> str | None:
    """Warn when the training compositions cannot fix every element's shift on its own.

    With one stoichiometry (all frames C2H6O) the data fix only ``2δ_C + 6δ_H + δ_O``: a
    structure of another composition then gets an arbitrary energy offset, unless isolated-atom
    energies of the elements anchor the rest. Returns the message, or None.
    """

    elements = sorted({int(z) for f in frames for z in f.atoms.numbers})
    counts = composition_matrix(frames, elements)
    rank = int(np.linalg.matrix_rank(counts))
    # an isolated-atom energy fixes its element's shift on its own: one more composition
    given = [k for k, z in enumerate(elements) if chemical_symbols[z] in (isolated or {})]
    if int(np.linalg.matrix_rank(np.vstack([counts, np.eye(len(elements))[given]]))) >= len(elements):
        return None
    symbols = ", ".join(chemical_symbols[z] for z in elements)
    anchored = [chemical_symbols[elements[k]] for k in given]
    with_isolated = f" and the isolated-atom energies of {', '.join(anchored)}" if anchored else ""
    message = (
        f"the training frames hold {rank} independent composition(s) for {len(elements)} elements "
        f"({symbols}){with_isolated}: the per-element energy shifts are fixed only in combination, "
        "so energies of other compositions (other molecules, formation energies) carry an arbitrary "
        "offset; give isolated-atom energies (--isolated-atoms, or frames tagged "
        "config_type=IsolatedAtom) of the other elements to fix it"
    )
    logger.warning(message)
    return message


ECHO_FORCES_MAE = 0.05
"""meV/Å: training labels closer than this to the base model's forces are its own predictions
(DFT and a foundation model differ by tens to hundreds of meV/Å)."""

ECHO_MIN_FORCE = 1.0
"""meV/Å: least mean absolute label force for the comparison to mean anything. Forces that vanish
by symmetry (an equation of state, a relaxed crystal) are zero in the DFT and in any model."""


def warn_if_labels_are_the_base_models(before: Mapping[str, float], frames: Sequence[Frame]) -> str | None:
    """Warn when the labels equal the base model's predictions (``before``: the training-frame
    errors of base + shifts, as :func:`~.metrics.error_metrics` gives them; ``frames``: those
    training frames): a file of the model's own outputs, which a fine-tune can only reproduce.
    Frames whose forces all but vanish (mean absolute force below :data:`ECHO_MIN_FORCE`) cannot
    tell, and never warn. Returns the message, or None."""
    forces = before.get("forces_mae")
    if forces is None or forces >= ECHO_FORCES_MAE:
        return None
    labelled = [np.ravel(f.forces) for f in frames if f.forces is not None]
    if not labelled or 1000.0 * float(np.mean(np.abs(np.concatenate(labelled)))) < ECHO_MIN_FORCE:
        return None
    message = (
        f"the training forces equal the base model's to {forces:.2g} meV/Å (mean absolute "
        "difference; DFT and a foundation model differ by tens of meV/Å or more): these labels look "
        "like the base model's own predictions, not DFT. Check which keys hold the DFT values "
        "(--energy-key, --forces-key)"
    )
    logger.warning(message)
    return message


def warn_if_reference_labels_unread(frames: Sequence[Frame]) -> str | None:
    """Warn when frames read without ``--energy-key``/``--forces-key`` carry reference labels
    under their own names (``REF_energy``, ``DFT_forces``): files written after a model was run
    on DFT data keep the model's predictions under ``energy`` and ``forces``, and training on
    those fits the model to itself. Returns the message, or None."""
    keys = sorted({key for frame in frames for key in frame.reference_keys})
    if not keys:
        return None
    carrying = [f for f in frames if f.reference_keys]
    message = (
        f"{len(carrying)} of {_describe_frames(frames)} also carry {', '.join(keys)} (e.g. "
        f"{carrying[0].source}); their labels were read from 'energy' and 'forces'. If those keys "
        "hold the DFT values, pass --energy-key and --forces-key (--stress-key, --virial-key) "
        "with their names (energy_key= ... in Python)"
    )
    logger.warning(message)
    return message


def warn_if_energy_labels_mixed(frames: Sequence[Frame]) -> str | None:
    """Warn when some energies are free energies and others are not.

    Without ``--energy-key`` each frame's energy is its ``free_energy`` where it has one, else
    its ``energy``. VASP's ``free_energy`` (TOTEN) holds the electronic entropy term of a smeared
    calculation and its ``energy`` the sigma -> 0 extrapolation; for metals they differ by meV
    to tens of meV per atom, so files of both kinds in one training set disagree by that much.
    Sets of the two kinds that share no element do not meet in any energy shift (a molecule set
    without smearing beside a metal's free energies), and are not reported. Returns the message,
    or None.
    """
    by_label: dict[str, list[Frame]] = {}
    for frame in frames:
        if frame.energy_label is not None:
            by_label.setdefault(frame.energy_label, []).append(frame)
    if not {"free_energy", "energy"} <= set(by_label):
        return None
    free, plain = by_label["free_energy"], by_label["energy"]
    shared = {int(z) for f in free for z in f.atoms.numbers} & {
        int(z) for f in plain for z in f.atoms.numbers
    }
    if not shared:
        return None
    message = (
        f"{len(free)} frame(s) have free energies (free_energy, e.g. {free[0].source}) and "
        f"{len(plain)} have only an energy (energy, e.g. {plain[0].source}), with elements in "
        f"common ({', '.join(chemical_symbols[z] for z in sorted(shared))}): for smeared (metallic) "
        "calculations the two differ by the electronic entropy term; pass --energy-key to read "
        "one kind everywhere (energy_key= in Python)"
    )
    logger.warning(message)
    return message


def warn_if_charge_states_mixed(frames: Sequence[Frame], takes_charge_and_spin: bool) -> str | None:
    """Warn when training frames differ in total charge or spin and the base model ignores both.

    A model without charge and spin inputs sees a cation and the neutral molecule at the same
    geometry as one structure with two energies; a delta cannot fit both. Returns the message,
    or None.
    """
    if takes_charge_and_spin:
        return None
    by_state: dict[tuple[float, float], str] = {}
    for frame in frames:
        by_state.setdefault(charge_and_spin(frame.atoms, frame.source), frame.source)
    if len(by_state) < 2:
        return None
    examples = "; ".join(f"charge {c:g}, spin {s:g} (e.g. {source})" for (c, s), source in by_state.items())
    message = (
        f"training frames come in {len(by_state)} charge and spin states ({examples}), but the base "
        "model takes no charge or spin input: it sees each state as the same kind of structure; "
        "train on one state, or use a base model with charge and spin embeddings"
    )
    logger.warning(message)
    return message


def warn_if_spin_disagrees_with_magmom(frames: Sequence[Frame], takes_charge_and_spin: bool) -> str | None:
    """Warn when a spin-conditioned base would train spin-polarised DFT frames as singlets.

    The spin multiplicity 2S + 1 comes from ``atoms.info["spin"]`` (1 when absent); a DFT run
    that converged to a total moment M (μB) found a state with 2S ≈ |M|, so a triplet O2 read
    without ``info["spin"]`` would be trained as a singlet. Only singlets are compared, against
    moments of 0.5 μB or more: files often give only the local moments, whose sum misses the
    moment between the atoms (GPAW's O2: 1.43 of 2.0 μB), too rough to check a multiplicity
    that was given. Returns the message, or None.
    """
    if not takes_charge_and_spin:
        return None
    polarised = [
        f
        for f in frames
        if f.magmom is not None and f.magmom >= 0.5 and charge_and_spin(f.atoms, f.source)[1] == 1
    ]
    if not polarised:
        return None
    first = polarised[0]
    message = (
        f"{len(polarised)} frame(s) are singlets (spin multiplicity 1: atoms.info['spin'] "
        f"absent or 1) but come from a spin-polarised DFT solution (e.g. {first.source}: magnetic moment "
        f"{first.magmom:.2f} μB); the base model takes the multiplicity as an input, so set "
        "atoms.info['spin'] = 2S + 1 (2S: the total moment in μB) for each frame"
    )
    logger.warning(message)
    return message


def check_labels(
    train: Sequence[Frame],
    valid: Sequence[Frame],
    base_train: Mapping[int, Mapping[str, np.ndarray]],
    base_valid: Mapping[int, Mapping[str, np.ndarray]],
    isolated: Mapping[str, float] | None,
    takes_charge_and_spin: bool,
    sources: str,
) -> tuple[dict[str, float], list[str]]:
    """Every check of this module on the training and validation frames (validation frames
    choose the restored epoch, so their labels get the same checks).

    ``base_train``/``base_valid``: the base model's predictions per frame index (eV, eV/Å,
    eV/Å³), before energy shifts; ``isolated``: isolated-atom energies (eV) by symbol;
    ``sources``: how messages name the files. Returns the label slopes and the warnings given.
    """
    checked = [*train, *valid]
    base_checked = {**base_train, **{len(train) + k: p for k, p in base_valid.items()}}
    slopes = label_slopes(checked, base_checked)
    messages = warn_about_label_scales(slopes, sources)
    stress_offset = warn_about_stress_offset(checked, base_checked)
    pulay = (
        stress_offset
        or warn_if_stresses_disagree_with_energies(checked, base_checked)
        or warn_if_slab_stresses_disagree_with_forces(checked)
    )
    further = (
        warn_if_energies_per_atom_of_one_size(checked, slopes),
        warn_about_stray_energies(checked, base_checked),
        warn_about_net_forces(checked),
        pulay or warn_about_stray_stresses(checked, base_checked),  # one cause, one message
        warn_if_shear_order_differs(checked, base_checked),
        warn_if_shifts_underdetermined(train, isolated),
        warn_if_energy_labels_mixed(checked),
        warn_if_reference_labels_unread(checked),
        warn_if_charge_states_mixed(checked, takes_charge_and_spin),
        warn_if_spin_disagrees_with_magmom(checked, takes_charge_and_spin),
    )
    return slopes, messages + [message for message in further if message]
