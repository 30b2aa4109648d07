"""RV against RV2 on unrelated random matrices as p/n grows (Smilde et al. 2009).

X and Y are independent standard Gaussian (n x p) matrices, so every similarity measure should
say "unrelated". With n fixed (50) and p growing on a log grid (5 to 2000), the script draws
``--reps`` pairs per p and computes

    RV (uncentred)      rv(x, y, center=False)        Robert & Escoufier 1976 on the raw input
    RV (centred)        rv(x, y)                      = linear CKA (Kornblith et al. 2019)
    RV2 (centred)       rv2(x, y)                     Smilde et al. 2009 on column-centred input
    RV2 (uncentred)     rv2(x, y, center=False)       hoggorm's RV2coeff on the raw input
    linear CKA          linear_cka(x, y)              (identical to centred RV)
    debiased CKA        linear_cka(x, y, debiased=True)   unbiased HSIC (Song et al. 2012)

and prints mean +- sd per p beside two closed-form large-n approximations for i.i.d. Gaussian
data: E[RV] ~ p / (p + n - 1), and, for centred RV2, p / (p + (n - 1)^2 + 1). The second one
comes from centring: the centred Gram H X Xᵀ H has off-diagonal entries with mean -p/n (the same
for X and Y, hence "similar") and noise of size sqrt(p), so once p is of the order of n^2 the
shared mean dominates and centred RV2 drifts towards 1. Uncentred RV2 and debiased CKA stay at 0.

Writes <out>/rv_vs_rv2.png (mean +- sd against p/n, log x) and <out>/rv_vs_rv2.csv.

Run: python examples/rv_vs_rv2.py [--n 50] [--reps 20] [--out examples/output/rv_vs_rv2] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from lightning_repsim import functional as F

MEASURES = {
    "RV (uncentred)": lambda x, y: F.rv(x, y, center=False),
    "RV (centred) = linear CKA": lambda x, y: F.rv(x, y, center=True),
    "RV2 (centred)": lambda x, y: F.rv2(x, y, center=True),
    "RV2 (uncentred)": lambda x, y: F.rv2(x, y, center=False),
    "linear CKA": lambda x, y: F.linear_cka(x, y),
    "debiased CKA": lambda x, y: F.linear_cka(x, y, debiased=True),
}
SHORT = ["RV", "RVc", "RV2c", "RV2u", "CKA", "dCKA"]


def p_grid(low: int, high: int, points: int) -> list[int]:
    return sorted({int(round(v)) for v in np.logspace(np.log10(low), np.log10(high), points)})


def run(n: int, ps: list[int], reps: int, seed: int) -> dict[str, np.ndarray]:
    """values[measure] has shape (len(ps), reps)."""
    generator = torch.Generator().manual_seed(seed)
    values = {m: np.zeros((len(ps), reps)) for m in MEASURES}
    for i, p in enumerate(ps):
        for r in range(reps):
            x = torch.randn(n, p, generator=generator, dtype=torch.float64)
            y = torch.randn(n, p, generator=generator, dtype=torch.float64)
            for name, fn in MEASURES.items():
                values[name][i, r] = float(fn(x, y))
    return values


def main(argv: list[str] | None = None) -> dict:
    """Run the example; print the findings and return them as numbers (examples/results.py formats them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50, help="examples (rows), fixed")
    parser.add_argument("--pmin", type=int, default=5)
    parser.add_argument("--pmax", type=int, default=2000)
    parser.add_argument("--points", type=int, default=15, help="points on the log grid of p")
    parser.add_argument("--reps", type=int, default=20, help="random pairs per p")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="examples/output/rv_vs_rv2")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="6 points, 5 repetitions")
    args = parser.parse_args(argv)
    if args.quick:
        args.points, args.reps = 6, 5

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    n = args.n
    ps = p_grid(args.pmin, args.pmax, args.points)
    values = run(n, ps, args.reps, args.seed)
    theory_rv = [p / (p + n - 1) for p in ps]
    theory_rv2c = [p / (p + (n - 1) ** 2 + 1) for p in ps]

    print(f"Independent N(0, 1) matrices X, Y of shape ({n}, p); mean (sd) over {args.reps} pairs per p.")
    print(
        "RV = uncentred RV, RVc = centred RV, RV2c / RV2u = centred / uncentred RV2, CKA = linear CKA, "
        "dCKA = debiased CKA;"
    )
    print("theory: E[RV] ~ p/(p+n-1), E[RV2c] ~ p/(p+(n-1)^2+1) (large-n approximations).\n")
    header = f"{'p':>5} {'p/n':>6} " + " ".join(f"{s:>15}" for s in SHORT) + f" {'RV theory':>10} {'RV2c theory':>11}"
    print(header)
    rows = []
    for i, p in enumerate(ps):
        cells = [f"{values[m][i].mean():+.3f} ({values[m][i].std(ddof=1):.3f})" for m in MEASURES]
        print(
            f"{p:>5} {p / n:>6.2f} "
            + " ".join(f"{c:>15}" for c in cells)
            + f" {theory_rv[i]:>10.3f} {theory_rv2c[i]:>11.3f}"
        )
        rows.append(
            [p, p / n]
            + [v for m in MEASURES for v in (values[m][i].mean(), values[m][i].std(ddof=1))]
            + [theory_rv[i], theory_rv2c[i]]
        )
    same = max(float(np.abs(values["linear CKA"] - values["RV (centred) = linear CKA"]).max()), 0.0)
    print(f"\nmax |linear CKA - centred RV| over all draws: {same:.1e}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "rv_vs_rv2.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["p", "p_over_n"]
            + [f"{s}_{k}" for s in SHORT for k in ("mean", "sd")]
            + ["rv_theory", "rv2_centred_theory"]
        )
        writer.writerows(rows)

    ratio = np.array(ps) / n
    figure, axis = plt.subplots(figsize=(7.5, 4.8))
    styles = {
        "RV (uncentred)": ("C0", "o", "-"),
        "RV (centred) = linear CKA": ("C1", "s", "-"),
        "RV2 (centred)": ("C2", "^", "-"),
        "RV2 (uncentred)": ("C3", "v", "-"),
        "debiased CKA": ("C4", "D", "-"),
    }
    for name, (colour, marker, line) in styles.items():
        mean, sd = values[name].mean(1), values[name].std(1, ddof=1)
        axis.plot(ratio, mean, color=colour, marker=marker, linestyle=line, markersize=4, label=name)
        axis.fill_between(ratio, mean - sd, mean + sd, color=colour, alpha=0.18, linewidth=0)
    axis.plot(ratio, theory_rv, color="C0", linestyle=":", linewidth=1, label="p/(p+n-1)")
    axis.plot(ratio, theory_rv2c, color="C2", linestyle=":", linewidth=1, label="p/(p+(n-1)²+1)")
    axis.axhline(0, color="grey", linewidth=0.6)
    axis.set_xscale("log")
    axis.set_xlabel(f"p / n   (n = {n})")
    axis.set_ylabel(f"similarity of independent X, Y  (mean ± sd, {args.reps} pairs)")
    axis.set_title(
        "Unrelated random matrices: RV tends to 1; uncentred RV2 and debiased CKA stay at 0;\n"
        "centred RV2 drifts up once p approaches n²",
        fontsize=10,
    )
    axis.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(out / "rv_vs_rv2.png", dpi=130)
    print(f"figure: {out / 'rv_vs_rv2.png'}\ntable: {out / 'rv_vs_rv2.csv'}")
    print(f"runtime: {time.perf_counter() - start:.1f} s")
    return {
        "n": n,
        "reps": args.reps,
        "p": [int(p) for p in ps],
        "mean": {m: [round(float(v.mean()), 3) for v in values[m]] for m in MEASURES},
        "sd": {m: [round(float(v.std(ddof=1)), 3) for v in values[m]] for m in MEASURES},
        "theory_rv": [round(t, 3) for t in theory_rv],
        "theory_rv2c": [round(t, 3) for t in theory_rv2c],
    }


if __name__ == "__main__":
    main()
