"""Run every ``benchmarks/bench_*.py`` in turn, then assemble ``BENCHMARKS.md`` at the repository root.

Each benchmark script writes its own section to ``benchmarks/results/<name>.md``; this script only
runs them (one process each, so one failure does not stop the others) and concatenates the
sections under a short header. ``make bench`` calls it after installing the ``bench`` extra.

Usage::

    python benchmarks/run_all.py                 # every benchmark, then BENCHMARKS.md
    python benchmarks/run_all.py --quick         # pass --quick to every benchmark (smoke test)
    python benchmarks/run_all.py --assemble-only # rebuild BENCHMARKS.md from the existing results
    python benchmarks/run_all.py --only similarity
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
OUTPUT = ROOT / "BENCHMARKS.md"

HEADER = """# Benchmarks

Speed, memory and accuracy of lightning_repsim side by side with peer libraries, on CPU and, where
one was available, on GPU. Each section below is written by one script in `benchmarks/` and says
which machine it ran on; numbers from different machines are not comparable.

To rerun everything: `make bench` (installs the `bench` extra, e.g. torch-cka, then runs
`python benchmarks/run_all.py`, which runs every `benchmarks/bench_*.py` and rebuilds this file from
`benchmarks/results/*.md`). One benchmark alone: `python benchmarks/bench_<name>.py`, then
`python benchmarks/run_all.py --assemble-only`. A smoke test of every script:
`python benchmarks/run_all.py --quick` (tiny sizes; this file is not rebuilt).
"""


def scripts(only: list[str] | None = None) -> list[Path]:
    found = sorted(HERE.glob("bench_*.py"))
    if only:
        found = [p for p in found if p.stem.removeprefix("bench_") in only or p.stem in only]
    return found


def run(script: Path, extra: list[str]) -> tuple[int, float]:
    print(f"[run_all] {script.name} {' '.join(extra)}".rstrip(), flush=True)
    start = time.perf_counter()
    rc = subprocess.run([sys.executable, str(script), *extra], cwd=ROOT).returncode
    elapsed = time.perf_counter() - start
    print(f"[run_all] {script.name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {elapsed:.0f} s", flush=True)
    return rc, elapsed


def assemble() -> Path:
    """Write BENCHMARKS.md: the header, then every results/*.md section in name order."""
    sections = [p.read_text(encoding="utf-8").strip() for p in sorted(RESULTS.glob("*.md"))]
    if not sections:
        sections = ["_No results yet: run `make bench`._"]
    OUTPUT.write_text(HEADER + "\n" + "\n\n".join(sections) + "\n", encoding="utf-8")
    return OUTPUT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark (smoke test)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks (e.g. similarity)")
    parser.add_argument("--assemble-only", action="store_true", help="skip running; rebuild BENCHMARKS.md")
    args = parser.parse_args(argv)

    failed = []
    if not args.assemble_only:
        todo = scripts(args.only)
        if not todo:
            print("[run_all] no benchmarks/bench_*.py matched", file=sys.stderr)
            return 2
        for script in todo:
            rc, _ = run(script, ["--quick"] if args.quick else [])
            if rc:
                failed.append(script.name)
    if not args.quick:
        print(f"[run_all] wrote {assemble().relative_to(ROOT)}")
    if failed:
        print(f"[run_all] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
