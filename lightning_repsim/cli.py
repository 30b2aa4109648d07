"""``lightning-repsim``: compare runs, report convergence and export similarities, from the stores.

Every command reads the snapshot stores that :class:`~lightning_repsim.RepresentationSimilarity`
leaves in each run directory (``<log_dir>/repsim``); no model is re-run and nothing is unpickled.
A ``RUN`` argument may be the run directory (``lightning_logs/version_3``), the store directory
itself (``lightning_logs/version_3/repsim``) or a log directory that holds exactly one run with a
store (``lightning_logs``). A run directory that several fits wrote into holds one store per fit
(``repsim``, ``repsim-1``, ...); pass the one you mean, e.g. ``lightning_logs/version_3/repsim-1``.

Usage::

    lightning-repsim compare RUN_A RUN_B [--step last|N] [--measure M ...] [--out DIR]
                             [--tensorboard] [--interval 0.95]
    lightning-repsim report RUN [--measure M ...] [--threshold 0.95] [--out DIR] [--interval 0.95]
    lightning-repsim export RUN [--format csv|json] [--out FILE] [--measure M ...]
                            [--reference final|previous|init ...] [--interval 0.95]
    lightning-repsim verify RUN [RUN ...]

``compare``
    The L_a x L_b matrix of every layer of run A against every layer of run B at one step, per
    measure (both runs must have used the same probe set: same probe hash), as PNG heatmaps and
    CSV files in ``--out`` (default ``./repsim-compare``), optionally as a TensorBoard run in
    ``--out/tensorboard`` to open beside the training runs. From Python:
    :func:`lightning_repsim.store.similarity_between`, which computes it here.
``report``
    Every stored snapshot of each layer against its last one: convergence map, curves, the step
    at which each layer converges (a table in the terminal) and the run's freeze events from its
    TensorBoard files, as PNG / CSV / text files in ``--out`` (default: ``repsim-report`` in the run
    directory, or ``repsim-report-1``, ... beside an earlier report; an earlier report is never
    overwritten unless ``--overwrite``).
``export``
    Every matrix as tidy rows ``run, step, measure, reference, layer_a, layer_b, value``: each
    step against the final snapshot (per layer), the previous step and the first step (all
    pairs of layers), as CSV or JSON (NaN becomes ``null``), to ``--out`` or standard output.
``verify``
    Reads every byte of each store and checks it against the manifest and the checksums: prints
    ``OK`` per store, or ``DAMAGED`` and one line per damaged or foreign file; exit status 1 when
    any store is damaged.

``--interval LEVEL`` adds confidence intervals (:func:`lightning_repsim.functional.interval_matrix`):
columns ``low`` and ``high`` (``export``; ``compare``'s ``<measure>__intervals.csv``, with the cells
tied with their row's best outlined in the heatmap), or each layer's convergence step as a range
(``report``). Without it nothing extra is computed.

``--measure`` may be repeated or given a comma list (``--measure linear_cka,rv2``). Each
measure's options (``debiased``, ``sigma``, ``center``, ``keep``) are those the run was logged
with, as recorded in its store's settings, or the defaults. ``pwcca`` needs the neurons of both
layers and is NaN (with a note) for a layer stored as a Gram factor (p > n).

Errors in the input (a missing run, a directory without a store, a corrupt or damaged store,
probe sets that differ, an unknown step or measure) exit with status 2 and one line on standard
error starting with ``lightning-repsim: error:``. A step file that is missing, truncated, damaged
(its checksum fails) or foreign (another run's, or recorded on another probe) is such an error;
with ``--allow-damaged`` the command leaves it out and goes on with the intact snapshots, with
one note per file left out. Progress bars go to standard error, only when
it is a terminal, and never with ``--quiet``.

Example:
    >>> main(["compare", "/no/such/run", "/no/such/run"])  # doctest: +SKIP
    lightning-repsim: error: /no/such/run: no such directory
    2
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning_repsim
from lightning_repsim._cli_runs import DAMAGED_HINT, CliError, Run, find_store_dir, open_run
from lightning_repsim.errors import RepSimError, RepSimIntegrityError, RepSimWarning, one_line
from lightning_repsim.measures import MEASURES, resolve_measures

if TYPE_CHECKING:
    from lightning_repsim.store import SnapshotStore

# Everything heavy (torch, Matplotlib, TensorBoard) is imported inside the commands, so that
# `lightning-repsim --help` and argument errors answer at once.

__all__ = ["main"]

PROG = "lightning-repsim"


# --------------------------------------------------------------------------- measures


def _measures(values: Sequence[str] | None, default: Sequence[str]) -> list[str]:
    """``--measure`` values (repeated and/or comma lists), validated, duplicates removed."""
    names = [part.strip() for value in (values or []) for part in value.split(",") if part.strip()]
    return list(resolve_measures(names or list(default)))


def _has_neurons(store: SnapshotStore, layer: str) -> bool:
    return store.kinds.get(layer) == "features"


def _pwcca_note(run: Run, layers: Iterable[str]) -> str | None:
    missing = [name for name in layers if not _has_neurons(run.store, name)]
    if not missing:
        return None
    return (
        f"pwcca is NaN for {run.name} layer(s) {', '.join(missing)}: stored as Gram factors (p > n), "
        "without the neurons pwcca needs"
    )


# --------------------------------------------------------------------------- output helpers


def _progress_factory(quiet: bool) -> Callable[..., Iterable]:
    from tqdm import tqdm

    disable = quiet or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())

    def progress(iterable: Iterable, **kwargs: Any) -> Iterable:
        return tqdm(iterable, disable=disable, leave=False, file=sys.stderr, dynamic_ncols=True, **kwargs)

    return progress


def _report_dir(run: Run, out: str | None, overwrite: bool) -> Path:
    """Where ``report`` writes: ``--out``, or ``<run dir>/repsim-report`` (``-1``, ``-2``, ... when an earlier
    report is there). A directory that already holds files is written into only with ``--overwrite``."""
    if out is not None:
        path = Path(out)
        if path.is_dir() and any(path.iterdir()) and not overwrite:
            raise CliError(f"{path}: holds files already (an earlier report?); pass another --out, or --overwrite")
        return path
    base = run.run_dir / "repsim-report"
    index = 0
    while (path := base.with_name(base.name + (f"-{index}" if index else ""))).exists() and any(path.iterdir()):
        index += 1
    return path


def _mkdir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CliError(f"{path}: exists and is not a directory") from None
    return path


# --------------------------------------------------------------------------- compare


def cmd_compare(args: argparse.Namespace) -> int:
    from lightning_repsim import report
    from lightning_repsim.analysis import logged_options, similarity_between

    progress = _progress_factory(args.quiet)
    _check_interval(args.interval)
    measures = _measures(args.measure, ["linear_cka"])
    run_a = open_run(args.run_a, allow_damaged=args.allow_damaged)
    run_b = open_run(args.run_b, allow_damaged=args.allow_damaged)
    if run_a.name == run_b.name:
        run_a.name, run_b.name = f"{run_a.name} [A]", f"{run_b.name} [B]"
    options = logged_options(run_a.store, measures)
    step = None if args.step == "last" else int(args.step)
    result = similarity_between(
        run_a.store,
        run_b.store,
        measures,
        step_a=step,
        step_b=step,
        measure_options=options,
        names=(run_a.name, run_b.name),
        progress=lambda items: progress(items, desc="measures", unit="measure"),
        interval=args.interval,
    )
    assert result.steps is not None  # a comparison of stored snapshots knows its steps
    (step_a, step_b), layers_a, layers_b = result.steps, result.layers_a, result.layers_b
    matrices = {m: values.numpy() for m, values in result.matrices.items()}
    out = _mkdir(Path(args.out))

    notes = [*run_a.notes, *run_b.notes]
    for measure in measures:
        if options[measure] != logged_options(run_b.store, [measure])[measure]:
            notes.append(
                f"{measure}: the runs were logged with different options; using {run_a.name}'s {options[measure]}"
            )
    if "pwcca" in measures:
        notes += [n for n in (_pwcca_note(run_a, layers_a), _pwcca_note(run_b, layers_b)) if n]

    title_a, title_b = f"{run_a.name} (step {step_a})", f"{run_b.name} (step {step_b})"
    written = []
    bounds = {m: (result.low[m].numpy(), result.high[m].numpy()) for m in result.low}
    for measure, values in matrices.items():
        written.append(
            report.write_matrix_csv(
                out / f"{measure}.csv", values, layers_a, layers_b, corner=f"{run_a.name} \\ {run_b.name}"
            )
        )
        ties = None
        if measure in bounds:
            low, high = bounds[measure]
            cells = [
                (a, b, float(values[i, j]), float(low[i, j]), float(high[i, j]))
                for i, a in enumerate(layers_a)
                for j, b in enumerate(layers_b)
            ]
            path = out / f"{measure}__intervals.csv"
            report.write_rows_csv(path, ("layer_a", "layer_b", "value", "low", "high"), cells)
            written.append(path)
            ties = report.row_ties(values, low, high)
        fig = report.heatmap_figure(
            values,
            layers_a,
            layers_b,
            measure=measure,
            row_title=title_a,
            col_title=title_b,
            title=f"{report.MEASURE_LABELS.get(measure, measure)}, n = {run_a.store.n}"
            + ("" if ties is None else f"; {args.interval:g} intervals"),
            ties=ties,
        )
        written.append(report.save_png(fig, out / f"{measure}.png"))
    written.append(
        report.write_json(
            out / "compare.json",
            {
                "run_a": {"name": run_a.name, "store": str(run_a.store.path), "step": step_a, "layers": layers_a},
                "run_b": {"name": run_b.name, "store": str(run_b.store.path), "step": step_b, "layers": layers_b},
                "probe_hash": run_a.store.probe_hash,
                "n": run_a.store.n,
                "measures": {
                    m: {
                        "options": options[m],
                        "matrix": v,
                        **({"low": bounds[m][0], "high": bounds[m][1]} if m in bounds else {}),
                    }
                    for m, v in matrices.items()
                },
                "interval": args.interval,
                "notes": notes,
                "library_version": lightning_repsim.__version__,
            },
        )
    )
    if args.tensorboard:
        report.log_comparison(
            out / "tensorboard",
            matrices,
            layers_a,
            layers_b,
            names=(run_a.name, run_b.name),
            step=step_a,
            probe_hash=run_a.store.probe_hash,
            n=run_a.store.n,
        )
        written.append(out / "tensorboard")

    print(f"A: {run_a.name} at step {step_a}  ({run_a.store.path})")
    print(f"B: {run_b.name} at step {step_b}  ({run_b.store.path})")
    print(f"probe hash {run_a.store.probe_hash}, n = {run_a.store.n}; {len(layers_a)} x {len(layers_b)} layers")
    print(report.comparison_summary(layers_a, layers_b, matrices))
    for note in notes:
        print(f"note: {note}")
    if not args.quiet:
        print(f"wrote {len(written)} files to {out}")
    return 0


# --------------------------------------------------------------------------- report


def cmd_report(args: argparse.Namespace) -> int:
    from lightning_repsim import report
    from lightning_repsim.analysis import (
        final_intervals,
        logged_measures,
        logged_options,
        read_freeze_log,
        similarity_to_final,
        write_convergence_report,
    )

    progress = _progress_factory(args.quiet)
    if not 0.0 < args.threshold <= 1.0:
        raise CliError(f"--threshold is a fraction of the final similarity in (0, 1], got {args.threshold:g}")
    run = open_run(args.run, allow_damaged=args.allow_damaged)
    measures = _measures(args.measure, logged_measures(run.store))
    store = run.store
    steps, layers = store.steps, store.layers
    if len(steps) < 2:
        raise CliError(
            f"{run.name} ({store.path}) holds one snapshot (step {steps[0]}); a convergence report needs at least two"
        )
    out = _mkdir(_report_dir(run, args.out, args.overwrite))
    notes = list(run.notes)
    if "pwcca" in measures and (note := _pwcca_note(run, layers)):
        notes.append(note)
    _check_interval(args.interval)
    layer_progress = lambda layers: progress(layers, desc="layers vs final snapshot", unit="layer")
    intervals = None
    if args.interval is None:
        values = similarity_to_final(store, logged_options(store, measures), progress=layer_progress)
    else:
        with_bounds = final_intervals(store, logged_options(store, measures), args.interval, progress=layer_progress)
        values = {m: v for m, (v, _, _) in with_bounds.items()}
        intervals = {m: (low.numpy(), high.numpy()) for m, (_, low, high) in with_bounds.items()}
    freeze = read_freeze_log(run.run_dir)
    freeze_steps = sorted({s for s, _ in freeze.events})

    written: list[Path] = []
    print(
        f"{run.name}: {len(layers)} layers, {len(steps)} snapshots (steps {steps[0]} to {steps[-1]}), "
        f"probe n = {store.n}"
    )
    reports = write_convergence_report(
        {m: v.numpy() for m, v in values.items()},
        layers,
        steps,
        out,
        threshold=args.threshold,
        title=run.name,
        freeze_steps=freeze_steps,
        intervals=intervals,
        level=args.interval,
    )
    for measure, result in reports.items():
        written += result.files
        label = report.MEASURE_LABELS.get(measure, measure)
        print(
            f"\n{label} to the final snapshot (step {steps[-1]}): the step from which each layer stays at "
            f">= {args.threshold:g} x its final value"
            + (
                ""
                if args.interval is None
                else f"; converged between a and b: from a on every step's {args.interval:g} interval reaches "
                "that level, from b on every one lies above it"
            )
            + f"\n{result.table}"
        )

    print()
    if freeze.events or freeze.fraction:
        written.append(
            report.save_png(
                report.freeze_figure(freeze.fraction, freeze.units, [s for s, _ in freeze.events]), out / "freeze.png"
            )
        )
        lines = [f"step {step}: {text}" if not text.startswith("step ") else text for step, text in freeze.events]
        written.append(out / "freeze_events.txt")
        written[-1].write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        final = f", {freeze.fraction[-1][1]:.0%} of parameters frozen at the end" if freeze.fraction else ""
        print(f"freeze events: {len(freeze.events)}{final}")
        for line in lines:
            print(f"  {line}")
    else:
        print(f"freeze events: none ({freeze.why_none})")
    for note in notes:
        print(f"note: {note}")
    if not args.quiet:
        print(f"wrote {len(written)} files to {out}")
    return 0


# --------------------------------------------------------------------------- export


def _references(values: Sequence[str] | None) -> list[str]:
    from lightning_repsim.analysis import REFERENCES

    names = [part.strip() for value in (values or []) for part in value.split(",") if part.strip()]
    unknown = [r for r in names if r not in REFERENCES]
    if unknown:
        raise CliError(f"unknown reference {unknown[0]!r}; choose from {', '.join(REFERENCES)}")
    return list(dict.fromkeys(names)) or list(REFERENCES)


def _check_interval(level: float | None) -> None:
    if level is not None and not 0.0 < level < 1.0:
        raise CliError(f"--interval is a coverage strictly between 0 and 1 (e.g. 0.95), got {level:g}")


def cmd_export(args: argparse.Namespace) -> int:
    from lightning_repsim import report
    from lightning_repsim.analysis import (
        INTERVAL_COLUMNS,
        ROW_COLUMNS,
        logged_measures,
        logged_options,
        similarity_rows,
    )

    progress = _progress_factory(args.quiet)
    to_stdout = args.out in (None, "-")
    fmt = args.format or ("json" if not to_stdout and args.out.lower().endswith(".json") else "csv")
    references = _references(args.reference)
    _check_interval(args.interval)
    columns = ROW_COLUMNS + (INTERVAL_COLUMNS if args.interval is not None else ())
    run = open_run(args.run, allow_damaged=args.allow_damaged)
    measures = _measures(args.measure, logged_measures(run.store))
    rows = similarity_rows(
        run.store,
        measures,
        references,
        run=run.name,
        measure_options=logged_options(run.store, measures),
        progress=progress,
        interval=args.interval,
    )
    if fmt == "json":
        records = [dict(zip(columns, row)) for row in rows]
        if to_stdout:
            for record in records:
                for key in ("value", *INTERVAL_COLUMNS):
                    if key in record:
                        record[key] = record[key] if math.isfinite(record[key]) else None
            sys.stdout.write(json.dumps(records, indent=1, allow_nan=False) + "\n")
        else:
            report.write_json(args.out, records)  # NaN -> null
    elif to_stdout:
        report.write_rows_csv(sys.stdout, columns, rows)
    else:
        _mkdir(Path(args.out).parent)
        report.write_rows_csv(args.out, columns, rows)
    for note in run.notes + ([n] if "pwcca" in measures and (n := _pwcca_note(run, run.store.layers)) else []):
        print(f"{PROG}: note: {note}", file=sys.stderr)
    if not (args.quiet or to_stdout):
        print(f"wrote {len(rows)} rows ({', '.join(measures)}; {', '.join(references)}) to {args.out}")
    return 0


# --------------------------------------------------------------------------- verify


def cmd_verify(args: argparse.Namespace) -> int:
    from lightning_repsim.store import open_store

    damaged = 0
    for path in args.run:
        store_dir = find_store_dir(Path(path))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RepSimWarning)
            try:
                store = open_store(store_dir, skip_damaged=True)
            except RepSimError as err:  # the manifest itself: nothing of the store can be trusted
                print(f"DAMAGED {store_dir}\n  {one_line(err)}")
                damaged += 1
                continue
            problems = [one_line(w.message) for w in caught if issubclass(w.category, RepSimWarning)]
        problems += store.verify()  # the saved probe (the steps were read whole on opening)
        probe = "probe saved" if store.has_probe else "no probe saved"
        checks = "checksums verified" if store.run_id is not None else "format 1: no checksums, headers checked"
        if problems:
            damaged += 1
            print(f"DAMAGED {store_dir}: {len(problems)} problem(s), {len(store.steps)} intact step(s)")
            for problem in problems:
                print(f"  {problem}")
        else:
            print(f"OK {store_dir}: {len(store.steps)} step(s), {len(store.layers)} layer(s), {probe}, {checks}")
    return 1 if damaged else 0


# --------------------------------------------------------------------------- argument parsing


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are a CliError (one line, exit 2) instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(f"{one_line(message)} (see '{self.prog} --help')")


def _step_arg(text: str) -> str:
    if text == "last":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'last' or a step number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 'last' or a step number >= 0, got {text!r}")
    return str(value)


_RUN_HELP = (
    "a run directory (holding repsim/), the repsim/ store itself (or repsim-N/, the store of a later fit "
    "into the same run directory), or a log directory with a single run (lightning_logs/ with one "
    "version_*/)"
)
_MEASURE_HELP = "similarity measure; repeat or give a comma list. Choices: " + ", ".join(MEASURES)


_INTERVAL_ARG = {
    "type": float,
    "metavar": "LEVEL",
    "help": "also the LEVEL (e.g. 0.95) confidence interval of every value: columns low and high "
    "(compare: <measure>__intervals.csv, and cells tied with their row's best outlined in the heatmap); "
    "empty (NaN) for svcca and pwcca, which have none (default: values only)",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``lightning-repsim`` argument parser (subcommands compare, report, export, verify)."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog=PROG,
        formatter_class=formatter,
        description="Compare runs, report convergence and export representational similarities from the "
        "snapshot stores that RepresentationSimilarity writes (<log_dir>/repsim). No model is re-run.",
        epilog=f"examples:\n  {PROG} compare runs/seed0/version_0 runs/seed1/version_0 --measure linear_cka,rv2\n"
        f"  {PROG} report runs/seed0/version_0 --threshold 0.9\n"
        f"  {PROG} export runs/seed0/version_0 --format json --out seed0.json\n"
        f"  {PROG} verify runs/seed0/version_0\n\n"
        f"'{PROG} COMMAND --help' describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {lightning_repsim.__version__}")
    common = _Parser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars and no 'wrote ...' line")
    common.add_argument(
        "--allow-damaged",
        action="store_true",
        help="use the intact snapshots of a store whose step files are partly missing, truncated, damaged "
        "or another run's, with a note per file left out (otherwise an error)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    compare = commands.add_parser(
        "compare",
        parents=[common],
        formatter_class=formatter,
        help="every layer of run A against every layer of run B, at one step",
        description="The L_a x L_b similarity matrix of every layer of RUN_A against every layer of RUN_B at "
        "one step, per measure, from the two runs' snapshot stores (same probe set required). "
        "Writes <measure>.png (heatmap), <measure>.csv and compare.json to --out and prints the "
        "values of same-named layers.",
        epilog=f"examples:\n  {PROG} compare runs/seed0/version_0 runs/seed1/version_0\n"
        f"  {PROG} compare runs/a runs/b --step 500 --measure rv2 --measure svcca --out figs/a_vs_b\n"
        f"  {PROG} compare runs/a runs/b --tensorboard --out runs/compare   "
        "# then: tensorboard --logdir runs",
    )
    compare.add_argument("run_a", metavar="RUN_A", help=_RUN_HELP)
    compare.add_argument("run_b", metavar="RUN_B", help="the other run, on the same probe set")
    compare.add_argument(
        "--step",
        type=_step_arg,
        default="last",
        help="'last' (each run's last snapshot, default) or a step stored in both runs",
    )
    compare.add_argument("--measure", action="append", metavar="M", help=_MEASURE_HELP + " (default linear_cka)")
    compare.add_argument(
        "--out", default="repsim-compare", metavar="DIR", help="output directory (default ./repsim-compare)"
    )
    compare.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write a TensorBoard run to DIR/tensorboard (heatmaps, same-layer scalars)",
    )
    compare.add_argument("--interval", **_INTERVAL_ARG)  # type: ignore[arg-type]
    compare.set_defaults(func=cmd_compare)

    rep = commands.add_parser(
        "report",
        parents=[common],
        formatter_class=formatter,
        help="convergence map, curves and freeze events of one run",
        description="Every stored snapshot of each layer against its last snapshot: a layer x step convergence "
        "map, one curve per layer and the step from which each layer stays at >= THRESHOLD x its "
        "final value (printed as a table), plus the run's freeze events (FreezeTraining's "
        "freeze/* TensorBoard tags) when it has any. PNG, CSV and text files go to --out.",
        epilog=f"examples:\n  {PROG} report runs/seed0/version_0\n"
        f"  {PROG} report runs/seed0/version_0/repsim --measure rv2 --threshold 0.9 --out figs/seed0",
    )
    rep.add_argument("run", metavar="RUN", help=_RUN_HELP)
    rep.add_argument(
        "--measure",
        action="append",
        metavar="M",
        help=_MEASURE_HELP + " (default: the measures the run was logged with)",
    )
    rep.add_argument(
        "--threshold",
        type=float,
        default=0.95,
        help="fraction of the final similarity that counts as converged (default 0.95)",
    )
    rep.add_argument(
        "--out",
        metavar="DIR",
        help="output directory (default: RUN's run directory/repsim-report, or repsim-report-1, ... beside an "
        "earlier report: never overwritten)",
    )
    rep.add_argument("--overwrite", action="store_true", help="write into an --out that already holds files")
    rep.add_argument(
        "--interval",
        type=float,
        metavar="LEVEL",
        help="also give each layer's convergence step as a range 'converged between a-b' from the LEVEL (e.g. "
        "0.95) confidence interval of every step's similarity to the final one (slower; default: none)",
    )
    rep.set_defaults(func=cmd_report)

    export = commands.add_parser(
        "export",
        parents=[common],
        formatter_class=formatter,
        help="every similarity matrix as tidy CSV or JSON rows",
        description="Every matrix computed from the store, one row per value with columns run, step, measure, "
        "reference, layer_a, layer_b, value. References: 'final' (each step against the last, per "
        "layer: layer_a == layer_b), 'previous' (each step against the step before, all pairs; "
        "layer_a at step, layer_b at the previous step) and 'init' (each step against the first "
        "stored step, all pairs). JSON is a list of records with NaN as null.",
        epilog=f"examples:\n  {PROG} export runs/seed0/version_0 > seed0.csv\n"
        f"  {PROG} export runs/seed0/version_0 --reference final --measure rv2 --out seed0.json\n"
        "  python -c \"import pandas as pd; print(pd.read_csv('seed0.csv').head())\"",
    )
    export.add_argument("run", metavar="RUN", help=_RUN_HELP)
    export.add_argument("--format", choices=("csv", "json"), help="default: json when --out ends in .json, else csv")
    export.add_argument("--out", metavar="FILE", help="output file (default: standard output)")
    export.add_argument(
        "--measure",
        action="append",
        metavar="M",
        help=_MEASURE_HELP + " (default: the measures the run was logged with)",
    )
    export.add_argument(
        "--reference",
        action="append",
        metavar="R",
        help="final, previous or init; repeat or give a comma list (default: all three)",
    )
    export.add_argument("--interval", **_INTERVAL_ARG)  # type: ignore[arg-type]
    export.set_defaults(func=cmd_export)

    verify = commands.add_parser(
        "verify",
        formatter_class=formatter,
        help="check every byte of one or more stores",
        description="Read every step file and the saved probe of each store and check them against the manifest "
        "(step, layers, shapes, probe hash, run id) and their checksums. Prints OK per intact store, or "
        "DAMAGED and one line per damaged or foreign file. Exit status 0 when all are intact, 1 when any "
        "is damaged, 2 on an error (no store at RUN).",
        epilog=f"examples:\n  {PROG} verify runs/seed0/version_0\n  {PROG} verify runs/*/version_0",
    )
    verify.add_argument("run", metavar="RUN", nargs="+", help=_RUN_HELP)
    verify.set_defaults(func=cmd_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lightning-repsim`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

    0 on success, 2 on a user error (one line on stderr: ``lightning-repsim: error: ...``).
    """
    parser = build_parser()
    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RepSimWarning)
            args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
            return args.func(args)
    except SystemExit as exit_:  # --help / --version
        return exit_.code if isinstance(exit_.code, int) else 0
    except CliError as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except (RepSimError, OSError) as err:  # RepSimValueError included; e.g. a corrupt store
        what = one_line(err) if isinstance(err, RepSimError) else f"{type(err).__name__}: {one_line(err)}"
        if isinstance(err, RepSimIntegrityError):  # a step file damaged after it was opened (a checksum on read)
            what += f" ({DAMAGED_HINT})"
        print(f"{PROG}: error: {what}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        shown = set()
        for w in caught or []:
            text = one_line(w.message)
            if issubclass(w.category, RepSimWarning) and text not in shown:
                shown.add(text)
                print(f"{PROG}: warning: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
