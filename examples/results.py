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
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
FILES = [ROOT / "README.md", EXAMPLES / "RESULTS.md", EXAMPLES / "RESULTS_freeze.md"]

#: example -> the arguments of its documented (full) run; ``--out`` is added.
FULL: dict[str, list[str]] = {
    "measures_on_digits": [],
    "rv_vs_rv2": [],
    "convergence": [],
    "sanity_check": [],
    "freeze_and_random_nets": [],
}
#: example -> the small settings checked by the tests (each runs in seconds).
QUICK: dict[str, list[str]] = {
    "measures_on_digits": ["--quick"],
    "rv_vs_rv2": ["--quick", "--points", "4", "--reps", "3", "--pmax", "200"],
    "convergence": ["--quick", "--epochs", "1", "--every", "4", "--no-svcca"],
    "sanity_check": ["--quick", "--seeds", "2", "--epochs", "1"],
}
#: examples whose output directory argument is not ``--out``.
OUT_ARG = {"measures_on_digits": None}


def run_example(name: str, argv: list[str], out: Path, logs: Path) -> dict:
    """Import ``examples/<name>.py`` and call its ``main(argv)``, its printout to ``logs/<name>.log``."""
    for path in (str(EXAMPLES), str(ROOT)):  # the examples' own helpers, and this checkout's library
        if path not in sys.path[:2]:
            sys.path.insert(0, path)
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if OUT_ARG.get(name, "--out") is not None:
        argv = [*argv, "--out", str(out / name)]
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "w") as log, contextlib.redirect_stdout(log):
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


def fmt_sanity(r: dict) -> dict[str, str]:
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
                "—" if m["median_gap"] is None else f"{m['median_gap']:.4f}",
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
        "median gap of a miss",
        "paper",
    ]
    text = (
        f"{r['seeds']} seeds × {r['epochs']} epochs (mean val_acc {r['val_acc_mean']:.3f}), {r['cases']} cases; "
        f"ties: misses that {r['interval']:g} confidence intervals cannot tell from a hit.\n\n" + _table(headers, rows)
    )
    m = r["measures"]
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
    readme = "; ".join(parts) + "."
    return {"sanity_check": text, "readme-sanity_check": readme}


def fmt_rv(r: dict) -> dict[str, str]:
    measures = list(r["mean"])
    rows = [
        [p, f"{p / r['n']:.2f}", *(f"{r['mean'][m][i]:+.3f}" for m in measures), f"{r['theory_rv'][i]:.3f}"]
        for i, p in enumerate(r["p"])
    ]
    text = f"n = {r['n']}, mean over {r['reps']} pairs per p:\n\n" + _table(["p", "p/n", *measures, "p/(p+n−1)"], rows)
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
    std = diag["freeze_vs_standard"]
    readme = (
        f"freeze-trained val acc {r['accuracy']['freeze']:.3f} (standard {r['accuracy']['standard']:.3f}); "
        f"RV2 to the standard network layer by layer {min(std):.3f}–{max(std):.3f}."
    )
    return {"freeze_and_random_nets": text, "readme-freeze_and_random_nets": readme}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the small settings; only the quick-* blocks")
    parser.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 if a block differs")
    parser.add_argument("--only", help="comma list of examples to run (default: all)")
    parser.add_argument("--logs", type=Path, help="where each example's printout goes (default: a temporary dir)")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    chosen = [n for n in settings if not args.only or n in args.only.split(",")]
    blocks: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        logs = args.logs or Path(tmp) / "logs"
        for name in chosen:
            start = time.perf_counter()
            # the full runs write where their docs say (examples/output/<name>); quick ones to a temporary dir
            out = Path(tmp) if args.quick else EXAMPLES / "output"
            numbers = run_example(name, settings[name], out, logs)
            for block, body in FORMATS[name](numbers).items():
                if args.quick and block.startswith("readme-"):
                    continue
                blocks[("quick-" if args.quick else "") + block] = body
            print(f"{name}: {time.perf_counter() - start:.1f} s (log: {logs / (name + '.log')})", flush=True)
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
