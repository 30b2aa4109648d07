"""Every measure on real data that ships offline: representations of sklearn's digits.

Five "layers" of the 1,797 8x8 digit images: the raw pixels, their top-10 principal components,
random ReLU features, the same ReLU features with half the neurons removed, and the one-hot class
labels. The script prints, for each measure, the similarity of every pair, so the measures'
conventions can be seen side by side (e.g. RV's upward bias against debiased CKA's).

Run: python examples/measures_on_digits.py [--quick]  (--quick: the first 300 digits)
"""

import argparse

import torch
from sklearn.datasets import load_digits

from lightning_repsim import functional as F


def digit_representations(n: int | None = None) -> dict[str, torch.Tensor]:
    digits = load_digits()
    pixels = torch.from_numpy(digits.data[:n]).double()
    centred = pixels - pixels.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    generator = torch.Generator().manual_seed(0)
    relu = torch.relu(centred @ torch.randn(64, 512, generator=generator, dtype=torch.float64))
    labels = torch.nn.functional.one_hot(torch.from_numpy(digits.target[:n]), 10).double()
    return {"pixels": pixels, "pca10": centred @ v[:10].T, "relu512": relu, "relu256": relu[:, :256], "labels": labels}


def main(argv: list[str] | None = None) -> dict:
    """Print every measure's matrix and return them (examples/results.py formats them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the first 300 digits only")
    args = parser.parse_args(argv)
    layers = digit_representations(300 if args.quick else None)
    results: dict = {"n": len(layers["pixels"]), "layers": list(layers), "matrices": {}}
    names = list(layers)
    width = max(map(len, names)) + 2
    for measure in F.MEASURES:
        matrix = F.similarity_matrix(layers, measure=measure)
        print(f"\n{measure}")
        print(" " * width + "".join(f"{n:>10}" for n in names))
        for name, row in zip(names, matrix.tolist()):
            print(f"{name:<{width}}" + "".join(f"{v:10.4f}" for v in row))
        results["matrices"][measure] = [[round(v, 4) for v in row] for row in matrix.tolist()]
    return results


if __name__ == "__main__":
    main()
