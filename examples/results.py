"""Regenerate the documented findings from the examples: every number in the generated blocks comes from a run.

Runs every example at its documented settings (``make results``), each in this process with its
printout going to ``<log dir>/<example>.log``, takes the numbers its ``main(argv)`` returns and
rewrites the blocks between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->`` in README.md,
examples/RESULTS.md and examples/RESULTS_freeze.md. Prose outside the blocks is written by hand
and should say what the blocks show.

``--quick`` runs the small settings of :data:`QUICK` instead (a minute on two cores) and touches only
the ``quick-*`` blocks; ``--check`` rewrites nothing and exits 1, naming the blocks, when the committed
blocks differ from what the run printed (``tests/test_examples.py`` runs ``--quick --check``).

Run: python examples/results.py [--quick] [--check] [--only convergence,sanity_check] [--logs DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
FILES = [ROOT / "README.md", EXAMPLES / "RESULTS.md", EXAMPLES / "RESULTS_freeze.md"]

#: run -> (example, the arguments of its documented run); ``--out examples/output/<run>`` is added.
FULL: dict[str, tuple[str, list[str]]] = {
    "measures_on_digits": ("measures_on_digits", []),
    "rv_vs_rv2": ("rv_vs_rv2", []),
    "convergence": ("convergence", []),
    "sanity_check": ("sanity_check", []),
    # the same with 10 seeds (the paper's number of networks)
    "sanity_check_10": ("sanity_check", ["--seeds", "10"]),
    # how much the quick mode's accuracy depends on the seeds drawn: four disjoint sets of 3 seeds
    **{f"sanity_check_quick_{k}": ("sanity_check", ["--quick", "--first-seed", str(k)]) for k in (0, 3, 6, 9)},
    # why the CCA family gets a lower feature cap: NaN rows with the CKA family's cap
    "sanity_check_cca512": ("sanity_check", ["--quick", "--cca-max-features", "512"]),
    "freeze_and_random_nets": ("freeze_and_random_nets", []),
}
#: run -> the small settings checked by the tests (about 35 s of CPU in all).
QUICK: dict[str, tuple[str, list[str]]] = {
    "measures_on_digits": ("measures_on_digits", ["--quick"]),
    "rv_vs_rv2": ("rv_vs_rv2", ["--quick", "--points", "4", "--reps", "3", "--pmax", "200"]),
    "convergence": ("convergence", ["--quick", "--epochs", "1", "--every", "4", "--no-svcca"]),
    "sanity_check": ("sanity_check", ["--quick", "--seeds", "2", "--epochs", "1"]),
    "freeze_and_random_nets": (
        "freeze_and_random_nets",
        ["--epochs", "1", "--random-n", "1", "--timing-repeats", "1"],
    ),
}
#: examples whose output directory argument is not ``--out``.
OUT_ARG = {"measures_on_digits": None}
#: the README's figures: docs/figures/<name> is a copy of what this run wrote (full runs only).
FIGURES = {
    "convergence_vs_depth.png": "convergence",
    "accuracy_bars.png": "sanity_check",
    "grid_rv2.png": "freeze_and_random_nets",
    "rv_vs_rv2.png": "rv_vs_rv2",
}


def run_example(name: str, argv: list[str], out: Path | None, logs: Path, log_name: str | None = None) -> dict:
    """Import ``examples/<name>.py`` and call its ``main(argv)``, its printout to ``logs/<log_name>.log``."""
    for path in (str(EXAMPLES), str(ROOT)):  # the examples' own helpers, and this checkout's library
        if path not in sys.path[:2]:
            sys.path.insert(0, path)
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if OUT_ARG.get(name, "--out") is not None and out is not None:
        argv = [*argv, "--out", str(out)]
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{log_name or name}.log", "w") as log, contextlib.redirect_stdout(log):
        return module.main(argv)


# --------------------------------------------------------------------------- formatting


def _table(headers: list[str], rows: list[list[object]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(":--" if a == "l" else "--:" for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f} %"


def fmt_convergence(r: dict) -> dict[str, str]:
    linear = r["measures"]["linear_cka"]
    svcca = r["measures"].get("svcca")
    rows = []
    for i, layer in enumerate(linear["layers"]):
        between = linear["between"][i]
        rows.append(
            [
                f"{i + 1} {layer}",
                f"{linear['at_first_step'][i]:.3f}",
                linear["converged"][i],
                "—" if between is None else f"{between[0]}–{between[1]}",
                *([svcca["converged"][i]] if svcca else []),
            ]
        )
    headers = [
        "layer",
        f"linear CKA at step {linear['first_step']}",
        "converged at step",
        f"converged between ({r['interval']:g} intervals)",
    ]
    headers += ["SVCCA: converged at step"] if svcca else []
    lines = [
        f"{r['epochs']} epochs ({r['steps']} steps), snapshot every {r['every']} steps, val_acc {r['val_acc']:.3f}; "
        f"converged = first step from which the similarity to the final snapshot stays ≥ {r['threshold']:g} × final.",
        "",
        _table(headers, rows),
        "",
        f"Spearman(depth, convergence step): linear CKA {linear['spearman']:+.2f} (p = {linear['p_value']:.3f})"
        + (f", SVCCA {svcca['spearman']:+.2f} (p = {svcca['p_value']:.3f})" if svcca else "")
        + f"; median step: conv layers {linear['median_conv']:g}, fc layers and logits {linear['median_fc']:g}.",
    ]
    ranges = ", ".join(
        f"{layer} {'—' if b is None else (str(b[0]) if b[0] == b[1] else f'{b[0]}–{b[1]}')}"
        for layer, b in zip(linear["layers"], linear["between"])
    )
    readme = (
        f"linear CKA: Spearman ρ(depth, convergence step) = {linear['spearman']:+.2f}; converged between "
        f"({r['interval']:g} intervals): {ranges}" + (f"; SVCCA ρ = {svcca['spearman']:+.2f}." if svcca else ".")
    )
    return {"convergence": "\n".join(lines), "readme-convergence": readme}


def _sanity_table(r: dict) -> str:
    rows = []
    for label, m in r["measures"].items():
        rows.append(
            [
                label,
                _pct(m["accuracy"]),
                _pct(m["within_one"]),
                m["misses"],
                "—" if m["ties"] is None else m["ties"],
                "—" if m["ties_inside"] is None else m["ties_inside"],
                "—" if m["ties"] is None else _pct(100.0 * (r["cases"] - m["misses"] + m["ties"]) / r["cases"]),
                "—" if m["median_gap"] is None else f"{m['median_gap']:.4f}",
                "—" if m.get("largest_gap") is None else f"{m['largest_gap']:.4f}",
                _pct(m["paper"]),
            ]
        )
    headers = [
        "measure",
        "ours",
        "within ±1 layer",
        "misses",
        "ties (intervals overlap)",
        "ties (value inside best's interval)",
        "hits or ties",
        "median gap of a miss",
        "largest gap",
        "paper",
    ]
    seeds = (
        f"seeds {r['first_seed']}–{r['first_seed'] + r['seeds'] - 1}" if "first_seed" in r else f"{r['seeds']} seeds"
    )
    val_range = f", {r['val_acc_min']:.3f}–{r['val_acc_max']:.3f}" if "val_acc_min" in r else ""
    return (
        f"{seeds} × {r['epochs']} epochs (val_acc mean {r['val_acc_mean']:.3f}{val_range}), {r['cases']} cases; "
        f"ties: misses that {r['interval']:g} confidence intervals cannot tell from a hit.\n\n" + _table(headers, rows)
    )


def _misses_by_cell(r: dict, label: str) -> str:
    """The off-diagonal cells of a measure's confusion matrix, largest first: 'relu2 → relu1 6, ...'."""
    layers, confusion = r["layers"], r["measures"][label]["confusion"]
    cells = [
        (confusion[i][j], i, j)
        for i in range(len(layers))
        for j in range(len(layers))
        if i != j and confusion[i][j] > 0
    ]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return ", ".join(f"{layers[i]} → {layers[j]} {count}" for count, i, j in cells) or "none"


def _confusion_text(r: dict, label: str) -> str:
    layers, confusion = r["layers"], r["measures"][label]["confusion"]
    lines = [" " * 8 + "".join(f"{name:>7}" for name in layers)]
    lines += [f"{name:<8}" + "".join(f"{v:>7d}" for v in row) for name, row in zip(layers, confusion)]
    return "\n".join(lines)


def fmt_sanity(r: dict) -> dict[str, str]:
    m = r["measures"]
    blocks = {"sanity_check": _sanity_table(r)}
    if "layers" in r:
        parts = [
            f"Where the argmax lands, counts over {r['pairs']} ordered pairs (rows: layer of seed A; columns: the "
            "argmax in seed B; a NaN row counts in no column). Misses by cell (layer → argmax, count):"
        ]
        for label in ("CKA (linear)", "SVCCA (ρ̄, keep 0.99)", "PWCCA"):
            parts += [
                "",
                f"{label}: {_misses_by_cell(r, label)}.",
                "",
                "```",
                _confusion_text(r, label),
                "```",
            ]
        blocks["sanity_check-confusion"] = "\n".join(parts)
    short = {
        "CKA (linear)": "linear CKA",
        "CKA (RBF 0.8)": "RBF CKA σ = 0.8",
        "CKA (RBF 0.4)": "σ = 0.4",
        "debiased CKA": "debiased CKA",
        "RV2": "RV2",
        "SVCCA (ρ̄, keep 0.99)": "SVCCA",
        "PWCCA": "PWCCA",
    }
    parts = []
    for label, name in short.items():
        entry = m[label]
        tie = "" if entry["ties"] is None else f", {entry['ties']} of {entry['misses']} misses tied"
        paper = "" if entry["paper"] is None else f" ({entry['paper']:.1f} %)"
        parts.append(f"{name} {entry['accuracy']:.1f} %{paper}{tie}")
    blocks["readme-sanity_check"] = "; ".join(parts) + "."
    return blocks


def fmt_sanity_10(r: dict) -> str:
    return (
        _sanity_table(r)
        + f"\n\nlinear CKA misses by cell (layer → argmax, count over {r['pairs']} ordered pairs): "
        + _misses_by_cell(r, "CKA (linear)")
        + "."
    )


def fmt_seed_sets(runs: list[dict]) -> str:
    """The quick mode's accuracy for several disjoint sets of seeds: how much the seeds drawn matter."""
    headers = ["measure"] + [f"seeds {r['first_seed']}–{r['first_seed'] + r['seeds'] - 1}" for r in runs]
    rows = [["mean val_acc", *(f"{r['val_acc_mean']:.3f}" for r in runs)]]
    rows += [[label, *(_pct(r["measures"][label]["accuracy"]) for r in runs)] for label in runs[0]["measures"]]
    return f"quick mode ({runs[0]['seeds']} seeds × {runs[0]['epochs']} epochs, {runs[0]['cases']} cases each):\n\n" + (
        _table(headers, rows)
    )


def fmt_rv(r: dict) -> dict[str, str]:
    measures = list(r["mean"])
    rows = [
        [
            p,
            f"{p / r['n']:.2f}",
            *(f"{r['mean'][m][i]:+.3f}" + (f" ({r['sd'][m][i]:.3f})" if "sd" in r else "") for m in measures),
            f"{r['theory_rv'][i]:.3f}",
            f"{r['theory_rv2c'][i]:.3f}",
        ]
        for i, p in enumerate(r["p"])
    ]
    text = f"n = {r['n']}, mean{' (sd)' if 'sd' in r else ''} over {r['reps']} pairs per p:\n\n" + _table(
        ["p", "p/n", *measures, "p/(p+n−1)", "p/(p+(n−1)²+1)"], rows
    )
    mean = r["mean"]
    key_rv = next(m for m in measures if m.startswith("RV (uncentred)"))
    key_rv2c = next(m for m in measures if m.startswith("RV2 (centred)"))
    readme = (
        f"at p = {r['p'][-1]}, uncentred RV {mean[key_rv][-1]:.3f} (p/(p+n−1) = {r['theory_rv'][-1]:.3f}), "
        f"centred RV2 {mean[key_rv2c][-1]:.3f} (p/(p+(n−1)²+1) = {r['theory_rv2c'][-1]:.3f})."
    )
    return {"rv_vs_rv2": text, "readme-rv_vs_rv2": readme}


def fmt_measures(r: dict) -> dict[str, str]:
    layers = r["layers"]
    others = layers[:-1]
    rows = [[m, *(f"{r['matrices'][m][i][-1]:.4f}" for i in range(len(others)))] for m in r["matrices"]]
    text = f"n = {r['n']} digits; similarity of each representation with the one-hot `{layers[-1]}`:\n\n" + _table(
        ["measure", *others], rows
    )
    return {"measures_on_digits": text}


def fmt_freeze(r: dict) -> dict[str, str]:
    names, labels = r["names"], r["labels"]
    acc = _table(["network", "val acc"], [[names.get(k, k), f"{v:.3f}"] for k, v in r["accuracy"].items()])
    diag = r["diagonal"]["rv2"]
    rows = [[key.replace("_vs_", " vs "), *(f"{v:.3f}" for v in values)] for key, values in diag.items()]
    text = f"{r['epochs']} epochs.\n\n{acc}\n\nRV2, layer i against layer i:\n\n" + _table(["pair", *labels], rows)
    if "linear_cka" in r["diagonal"]:
        gap = max(abs(a - b) for key, values in diag.items() for a, b in zip(values, r["diagonal"]["linear_cka"][key]))
        text += f"\n\nLargest |linear CKA − RV2| over these cells: {gap:.3f}."
    std = diag["freeze_vs_standard"]
    readme = (
        f"freeze-trained val acc {r['accuracy']['freeze']:.3f} (standard {r['accuracy']['standard']:.3f}); "
        f"RV2 to the standard network layer by layer {min(std):.3f}–{max(std):.3f}."
    )
    blocks = {"freeze_and_random_nets": text, "readme-freeze_and_random_nets": readme}
    if "fit_wall_s" in r:
        rows = [
            [
                names.get(k, k),
                f"{r['fit_wall_s'][k]:.1f}",
                f"{r['fit_cpu_s'][k]:.1f}",
                f"{r['median_step_ms'][k]:.1f}",
            ]
            for k in r["fit_wall_s"]
        ]
        phases = ", ".join(
            f"{ph['frozen']} frozen {ph['standard_ms']:.1f} / {ph['freeze_ms']:.1f} "
            f"(×{ph['standard_ms'] / ph['freeze_ms']:.2f})"
            for ph in r["step_time_phases"]
        )
        events = ", ".join(f"{e['unit']} at step {e['step']}" for e in r["freeze_events"])
        micro = ", ".join(f"{t:.1f}" for t in r["plain_torch_step_ms"])
        wall = r["fit_wall_s"]
        blocks["freeze_and_random_nets-timing"] = "\n".join(
            [
                f"{r['steps']} steps per fit; freeze-training froze {events}.",
                "",
                _table(["network", "fit wall s", "fit CPU s", "median ms/step"], rows),
                "",
                f"Standard vs freeze-trained fit: {wall['standard']:.1f} s vs {wall['freeze']:.1f} s wall, "
                f"×{wall['standard'] / wall['freeze']:.2f} the throughput. Median step time per freeze phase, "
                f"standard / freeze-trained (ms): {phases}. Plain-PyTorch micro-benchmark (forward + backward + "
                f"Adam, min of interleaved rounds) with 0, 1, ... units frozen: {micro} ms/step. "
                f"The whole script: {r['total_s']:.0f} s.",
            ]
        )
    return blocks


FORMATS: dict[str, Callable[[dict], dict[str, str]]] = {
    "convergence": fmt_convergence,
    "sanity_check": fmt_sanity,
    "rv_vs_rv2": fmt_rv,
    "measures_on_digits": fmt_measures,
    "freeze_and_random_nets": fmt_freeze,
}


# --------------------------------------------------------------------------- blocks


def block_pattern(name: str) -> re.Pattern[str]:
    return re.compile(rf"(<!-- results:{re.escape(name)} -->\n)(.*?)(<!-- /results:{re.escape(name)} -->)", re.S)


def apply_blocks(blocks: dict[str, str], check: bool) -> list[str]:
    """Rewrite (or, with ``check``, compare) every block; returns the problems found."""
    problems, found = [], set()
    for path in FILES:
        text = path.read_text(encoding="utf-8")
        new = text
        for name, body in blocks.items():
            pattern = block_pattern(name)
            if not pattern.search(new):
                continue
            found.add(name)
            match = pattern.search(new)
            assert match is not None
            if match.group(2) != body + "\n":
                problems.append(f"{path.relative_to(ROOT)}: block {name!r} differs from what the run printed")
            new = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(3), new)
        if not check and new != text:
            path.write_text(new, encoding="utf-8")
    problems += [f"no block {name!r} in {', '.join(p.name for p in FILES)}" for name in blocks if name not in found]
    return problems


def format_runs(numbers: dict[str, dict], quick: bool) -> dict[str, str]:
    """Every block, from each run's numbers (``numbers``: run -> what its ``main`` returned)."""
    blocks: dict[str, str] = {}
    for run, result in numbers.items():
        example = (QUICK if quick else FULL)[run][0]
        if run in FORMATS:
            for block, body in FORMATS[run](result).items():
                blocks[block if run == example else f"{run}-{block}"] = body
    if "sanity_check_10" in numbers:
        r = numbers["sanity_check_10"]
        blocks["sanity_check_10"] = fmt_sanity_10(r)
        linear = r["measures"]["CKA (linear)"]
        blocks["readme-sanity_check_10"] = (
            f"with {r['seeds']} seeds ({r['cases']} cases): linear CKA {linear['accuracy']:.1f} %, "
            f"{linear['ties']} of {linear['misses']} misses tied; RBF CKA σ = 0.4 "
            f"{r['measures']['CKA (RBF 0.4)']['accuracy']:.1f} %; "
            f"SVCCA {r['measures']['SVCCA (ρ̄, keep 0.99)']['accuracy']:.1f} %; "
            f"PWCCA {r['measures']['PWCCA']['accuracy']:.1f} %."
        )
    if "sanity_check_cca512" in numbers:
        r = numbers["sanity_check_cca512"]
        blocks["sanity_check_cca512"] = (
            f"quick mode ({r['seeds']} seeds × {r['epochs']} epochs, {r['cases']} rows) with the CCA cap at 512: "
            + ", ".join(
                f"{label} {r['measures'][label]['nan_rows']} NaN rows" for label in ("SVCCA (ρ̄, keep 0.99)", "PWCCA")
            )
            + "."
        )
    seed_sets = {run: r for run, r in numbers.items() if run.startswith("sanity_check_quick_")}
    if seed_sets:
        blocks["sanity_check-seed-sets"] = fmt_seed_sets(list(seed_sets.values()))
    if quick:  # no README blocks, and no timings: they differ from run to run
        blocks = {
            f"quick-{block}": body
            for block, body in blocks.items()
            if not block.startswith("readme-") and not block.endswith("-timing")
        }
    return blocks


def runtimes_block(walls: dict[str, float], settings: dict[str, tuple[str, list[str]]], machine: dict) -> str:
    rows = [
        [f"`python examples/{example}.py{''.join(' ' + a for a in argv)}`", f"{walls[run]:.0f} s"]
        for run, (example, argv) in settings.items()
    ]
    return (
        f"`make results` on {machine['date']}: {machine['cpu']}, {machine['cores']} usable cores, torch "
        f"{machine['torch']}, one torch thread (the examples' default); load average "
        f"{machine['load_start']} at the start, {machine['load_end']} at the end (other jobs shared the machine). "
        f"Wall time per run, all in one process (the first run includes importing torch), "
        f"{sum(walls.values()):.0f} s in all:\n\n" + _table(["run", "wall time"], rows)
    )


def copy_figure(source: Path, target: Path) -> bool:
    """Copy a run's figure over the README's copy, unless the two show the same pixels.

    PNG bytes also depend on the encoder (matplotlib's or the library's own, their metadata), so a
    figure that looks the same is left alone: no binary churn in git. Returns whether it copied.
    """
    from PIL import Image

    if target.is_file():
        with Image.open(source) as new, Image.open(target) as old:
            if new.size == old.size and new.convert("RGBA").tobytes() == old.convert("RGBA").tobytes():
                return False
    shutil.copyfile(source, target)
    return True


def machine_now() -> dict:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _machine

    info = _machine.machine_info()
    return {k: info[k] for k in ("date", "cpu", "cores", "torch")} | {"load": _machine.load_average()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small settings; only the quick-* blocks")
    parser.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 if a block differs")
    parser.add_argument("--only", help="comma list of runs to do (default: all); see FULL and QUICK")
    parser.add_argument("--logs", type=Path, help="where each run's printout and numbers go (default: a temporary dir)")
    parser.add_argument(
        "--from-logs",
        action="store_true",
        help="run nothing: format the numbers that the last run saved in --logs (<run>.json)",
    )
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    unknown = set(args.only.split(",")) - set(settings) if args.only else set()
    if unknown:
        parser.error(f"unknown run(s) {', '.join(sorted(unknown))}; choose from {', '.join(settings)}")
    if args.from_logs and not args.logs:
        parser.error("--from-logs needs --logs DIR")
    chosen = [n for n in settings if not args.only or n in args.only.split(",")]
    numbers: dict[str, dict] = {}
    walls: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        logs = args.logs or Path(tmp) / "logs"
        start_machine = machine_now()
        for run in chosen:
            saved = logs / f"{run}.json"
            if args.from_logs:
                record = json.loads(saved.read_text(encoding="utf-8"))
                numbers[run], walls[run] = record["numbers"], record["wall_s"]
                continue
            example, run_argv = settings[run]
            start = time.perf_counter()
            # the full runs write where their docs say (examples/output/<run>); quick ones to a temporary dir
            out = (Path(tmp) if args.quick else EXAMPLES / "output") / run
            numbers[run] = run_example(example, run_argv, out, logs, log_name=run)
            walls[run] = time.perf_counter() - start
            saved.write_text(json.dumps({"argv": run_argv, "wall_s": walls[run], "numbers": numbers[run]}, indent=1))
            print(f"{run}: {walls[run]:.1f} s (log: {logs / (run + '.log')})", flush=True)
        blocks = format_runs(numbers, args.quick)
        if not args.quick and chosen == list(settings):  # the runtimes of a whole `make results`
            if args.from_logs:
                machine = json.loads((logs / "machine.json").read_text(encoding="utf-8"))
            else:
                machine = start_machine | {"load_start": start_machine["load"], "load_end": machine_now()["load"]}
                (logs / "machine.json").write_text(json.dumps(machine, indent=1))
            blocks["runtimes"] = runtimes_block(walls, settings, machine)
        if not args.quick and not args.check and not args.from_logs:
            for figure, run in FIGURES.items():
                if run in numbers:
                    copy_figure(EXAMPLES / "output" / run / figure, ROOT / "docs" / "figures" / figure)
        problems = apply_blocks(blocks, args.check)
    if args.check and problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    missing = [p for p in problems if p.startswith("no block")]
    if missing:
        print("\n".join(missing), file=sys.stderr)
        return 1
    print(("checked " if args.check else "wrote ") + ", ".join(blocks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
