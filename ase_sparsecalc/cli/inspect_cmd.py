"""``sparsecalc inspect``: where a delta changes the model (layers, irreps l, elements, kinds).

``sparsecalc inspect DELTA`` prints a header (base, method, non-zeros, density, energy shifts)
and one table per grouping; ``sparsecalc inspect A B`` compares the non-zero sets of two deltas.
``--json`` prints one JSON document instead; ``--plot DIR`` also writes heatmap PNGs.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from ._common import non_negative_int

DEFAULT_BY = "layer,l,element,kind"
TITLES = {
    "all": "Overall",
    "tensor": "By tensor",
    "layer": "By layer",
    "module": "By module",
    "kind": "By module kind",
    "l": "By irrep l (output; n/a = radial hidden layers)",
    "path": "By path l_in->l_out (n/a->l: symmetric contraction)",
    "element": "By element (shared = not element-specific)",
}
METHOD_HYPERPARAMETERS = {
    "sparse": ("density", "hard_threshold", "masked_decay", "penalty"),
    "gmp": ("density",),
    "l1": ("density", "penalty"),
    "elora": ("rank",),
    "random": ("density",),  # ase_sparsecalc.testing.random_sparse_delta
}
"""The header's method-specific hyperparameters (all of them are in the --json output); other
methods show none of them."""
TRAINING_HYPERPARAMETERS = ("epochs", "batch_size", "lr", "lr_rewind", "train_readouts", "seed")
PLOT_TABLES = ("layer,l", "layer,element", "layer,kind")


def _groupings(text: str) -> list[str]:
    from ..analysis import GROUPINGS

    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in GROUPINGS]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a comma-separated list of {', '.join(GROUPINGS)} (e.g. {DEFAULT_BY})"
        )
    return names


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``sparsecalc inspect``."""
    parser = subparsers.add_parser(
        "inspect",
        help="show which layers, irreps and elements a delta changes",
        description=(
            "Tabulate where a sparse delta changes its base model: changed weights out of the "
            "trainable ones (density) and mean |Δ| per layer, irrep l (s, p, d, f), element and "
            "module kind. With two deltas, show how much their non-zero sets overlap."
        ),
    )
    parser.add_argument("delta", help="delta file (.safetensors)")
    parser.add_argument("other", nargs="?", help="second delta: compare the two non-zero sets")
    parser.add_argument("--base", help="base model name or file (default: the base the delta names)")
    parser.add_argument(
        "--by",
        type=_groupings,
        default=_groupings(DEFAULT_BY),
        help=f"comma-separated groupings (default: {DEFAULT_BY}; also path, module, tensor, all)",
    )
    parser.add_argument(
        "--trainable",
        choices=["auto", "all"],
        help="weights counted in each group's total: 'auto' (all but readouts; the default unless "
        "the delta records its trainable tensors) or 'all'",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--plot", metavar="DIR", help="also write heatmap PNGs into DIR")
    parser.add_argument(
        "--max-rows",
        type=non_negative_int,
        default=30,
        help="longest table printed; 0 prints all rows (default: 30)",
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Load the delta(s) and the base, print tables or JSON, write plots."""
    from ..analysis import base_backend
    from ..delta import SparseDelta

    delta = SparseDelta.load(args.delta)
    backend = base_backend(delta, args.base)
    if args.other is None:
        document = _inspect_one(args, delta, backend)
    else:
        document = _inspect_two(args, delta, SparseDelta.load(args.other), backend)
    if args.json:
        print(json.dumps(_json_safe(document), indent=1, sort_keys=False))
    return 0


def _inspect_one(args, delta, backend) -> dict[str, Any]:
    from ..analysis import delta_summary, pattern_tables

    summary = delta_summary(delta, backend, trainable=args.trainable)
    wanted = list(args.by) + ([g for g in PLOT_TABLES if g not in args.by] if args.plot else [])
    tables = pattern_tables(delta, backend, [g.split(",") if "," in g else g for g in wanted],
                            trainable=args.trainable)  # fmt: skip
    plots = []
    if args.plot:
        from ..analysis_plots import write_pattern_plots

        plots = [str(p) for p in write_pattern_plots(tables, args.plot)]
    shown = {g: tables[g] for g in args.by}
    if not args.json:
        print("\n".join(_header(args.delta, summary)))
        for grouping, rows in shown.items():
            print()
            print("\n".join(_pattern_table(grouping, rows, args.max_rows)))
        for path in plots:
            print(f"wrote {path}")
    return {"delta": args.delta, "summary": summary, "tables": shown, "plots": plots}


def _inspect_two(args, a, b, backend) -> dict[str, Any]:
    from ..analysis import compare_deltas

    tables = {g: compare_deltas(a, b, backend, by=g) for g in args.by}
    overall = compare_deltas(a, b, backend, by="all")[0]
    plots = []
    if args.plot:
        from ..analysis_plots import write_overlap_plot

        plots = [str(write_overlap_plot(compare_deltas(a, b, backend, by=("layer", "l")), args.plot))]
    if not args.json:
        for tag, path, d in (("A", args.delta, a), ("B", args.other, b)):
            print(f"{tag}  {path}: {d.nnz:,} non-zeros ({d.metadata.method}, base {d.metadata.base_model})")
        print(
            f"overlap: |A∩B| = {overall['n_both']:,}, |A∪B| = {overall['n_either']:,}, "
            f"Jaccard {_num(overall['jaccard'], '.4f')}, same sign {_pct(overall['sign_agreement'])}"
        )
        for grouping, rows in tables.items():
            print()
            groups = rows if grouping == "all" else rows[:-1]  # the last row is the overall one
            print("\n".join(_overlap_table(grouping, groups, args.max_rows)))
        for path in plots:
            print(f"wrote {path}")
    return {"a": args.delta, "b": args.other, "overall": overall, "tables": tables, "plots": plots}


# --------------------------------------------------------------------------- formatting
def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


STOP_REASONS = {
    "epochs": "",
    "early_stopping": " (early stopping)",
    "max_time": " (cut short by max_time: its schedules are unfinished)",
}


def _training_line(params: dict[str, Any]) -> str:
    """``"4 of 6 epochs (early stopping), best epoch 3, 12.3 s"`` from a fine-tune's recorded
    hyperparameters; "" for deltas that record no run (made in memory, older files)."""
    if params.get("epochs_run") is None or params.get("epochs") is None:
        return ""
    reason = params.get("stop_reason") or ""
    text = f"{params['epochs_run']} of {params.get('epochs_planned') or params['epochs']} epochs"
    text += STOP_REASONS.get(reason, f" ({reason})" if reason else "")
    if params.get("best_epoch") is not None:
        text += f", best epoch {params['best_epoch']}"
    if params.get("training_time_s") is not None:
        text += f", {params['training_time_s']:.1f} s"
    return text


def _header(path: str, s: dict[str, Any]) -> list[str]:
    params = s["hyperparameters"]
    shown = (
        ()
        if s["method"] == "shift"
        else (*METHOD_HYPERPARAMETERS.get(s["method"], ()), *TRAINING_HYPERPARAMETERS)
    )
    hyper = ", ".join(f"{k}={params[k]}" for k in shown if params.get(k) is not None)
    shifts = s["energy_shifts_meV"]
    shift_text = ", ".join(f"{k} {v:+.1f}" for k, v in shifts.items()) + " meV/atom" if shifts else "none"
    lines = [
        f"delta          {path}",
        f"base           {s['base_model']} ({s['backend']}, fingerprint {s['base_fingerprint'][:12] or '-'}"
        + (f", head {s['head']})" if s.get("head") else ")"),
        f"method         {s['method']}" + (f" ({hyper})" if hyper else ""),
        f"non-zeros      {s['nnz']:,} of {s['total']:,} trainable weights (density {_pct(s['density'])}) "
        f"in {s['tensors_changed']} tensors",
        f"energy shifts  {shift_text}",
    ]
    training = _training_line(params)
    if training:
        lines.insert(4, f"training       {training}")
    if s["base_fingerprint"] and s["analysed_fingerprint"] != s["base_fingerprint"]:
        lines.insert(
            2,
            f"analysed with  {s['analysed_base']} (fingerprint {s['analysed_fingerprint'][:12]}, "
            "not the delta's base)",
        )
    recorded = s["metadata_trainable_numel"]
    if recorded and recorded != s["total"]:
        lines.append(f"note           the delta records {recorded:,} trainable weights; totals below "
                     f"count {s['total']:,} (see --trainable)")  # fmt: skip
    return lines


def _limit(rows: list[dict[str, Any]], max_rows: int, size_key: str) -> tuple[list[dict[str, Any]], str]:
    if max_rows <= 0 or len(rows) <= max_rows:
        return rows, ""
    # the largest groups; groups the delta leaves untouched go into the note, not the table
    changed = [k for k in range(len(rows)) if rows[k][size_key] > 0]
    keep = set(sorted(changed, key=lambda k: -rows[k][size_key])[:max_rows])
    dropped = [r for k, r in enumerate(rows) if k not in keep]
    more = "more " if keep else ""
    note = (
        f"  ... {len(dropped)} {more}groups with {sum(r[size_key] for r in dropped):,} non-zeros "
        "(--max-rows 0 shows all)"
    )
    return [r for k, r in enumerate(rows) if k in keep], note


def _aligned(title: str, head: list[str], body: list[list[str]], note: str) -> list[str]:
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = "  " + "  ".join(f"{{:<{widths[0]}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [title, fmt.format(*head)]
    lines += [fmt.format(*row) for row in body]
    return lines + ([note] if note else [])


def _pattern_table(grouping: str, rows: list[dict[str, Any]], max_rows: int) -> list[str]:
    shown, note = _limit(rows, max_rows, "nnz")
    head = [grouping, "non-zeros", "total", "density", "mean|Δ|", "mean|Δ|/|W0|"]
    body = [
        [
            r["group"],
            f"{r['nnz']:,}",
            f"{r['total']:,}",
            _pct(r["density"]),
            _num(r["mean_abs_delta"], ".3e"),
            _num(r["rel_mean_abs_delta"], ".3e"),
        ]
        for r in shown
    ]
    return _aligned(TITLES.get(grouping, f"By {grouping}"), head, body, note)


def _overlap_table(grouping: str, rows: list[dict[str, Any]], max_rows: int) -> list[str]:
    shown, note = _limit(rows, max_rows, "n_either")
    head = [grouping, "|A|", "|B|", "|A∩B|", "Jaccard", "same sign"]
    body = [
        [
            r["group"],
            f"{r['n_a']:,}",
            f"{r['n_b']:,}",
            f"{r['n_both']:,}",
            _num(r["jaccard"], ".4f"),
            _pct(r["sign_agreement"]),
        ]
        for r in shown
    ]
    return _aligned(TITLES.get(grouping, f"By {grouping}"), head, body, note)


def _json_safe(value: Any) -> Any:
    """Replace NaN/inf floats by None so that the output is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
