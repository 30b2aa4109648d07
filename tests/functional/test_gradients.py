"""Gradients through the measures (issue 12): the Gram-based measures are differentiable (gradcheck in
float64), give the engine's values, and can be trained on (the README's distillation example); the
CCA family refuses an input that requires grad instead of silently detaching it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lightning_repsim import functional as F
from lightning_repsim.errors import RepSimValueError

PAIR_MEASURES = {
    "linear_cka": lambda x, y: F.linear_cka(x, y),
    "debiased_cka": lambda x, y: F.linear_cka(x, y, debiased=True),
    "rbf_cka": lambda x, y: F.rbf_cka(x, y, sigma=0.8),
    "rbf_cka_debiased": lambda x, y: F.rbf_cka(x, y, sigma=1.2, debiased=True),
    "rv": lambda x, y: F.rv(x, y),
    "rv_uncentred": lambda x, y: F.rv(x, y, center=False),
    "rv2": lambda x, y: F.rv2(x, y),
    "rv2_uncentred": lambda x, y: F.rv2(x, y, center=False),
    "minibatch_cka": lambda x, y: F.minibatch_cka(x, y, batch_size=6),
}


def _inputs(seed: int = 0, n: int = 12, p: int = 5, q: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(p, q, generator=g, dtype=torch.float64)) + 0.5 * torch.randn(
        n, q, generator=g, dtype=torch.float64
    )
    return x.requires_grad_(), y.requires_grad_()


@pytest.mark.parametrize("measure", sorted(PAIR_MEASURES))
def test_gradcheck_single_pair(measure):
    x, y = _inputs()
    assert torch.autograd.gradcheck(PAIR_MEASURES[measure], (x, y), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("measure", sorted(PAIR_MEASURES))
def test_value_with_grad_equals_the_engine_without(measure):
    x, y = _inputs(seed=3, n=40, p=30, q=7)
    with_grad = PAIR_MEASURES[measure](x, y)
    assert with_grad.requires_grad and with_grad.dtype == torch.float64
    without = PAIR_MEASURES[measure](x.detach(), y.detach())
    assert not without.requires_grad
    torch.testing.assert_close(with_grad.detach(), without, atol=1e-12, rtol=0)


@pytest.mark.parametrize("measure", ["linear_cka", "debiased_cka", "rbf_cka", "rv", "rv2"])
def test_similarity_matrix_propagates_gradients(measure):
    x, y = _inputs(seed=1)
    z = (x.detach() ** 2).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b, c: F.similarity_matrix({"a": a, "b": b}, {"c": c, "a2": a}, measure), (x, y, z), atol=1e-6
    )
    symmetric = F.similarity_matrix([x, y, z], measure=measure)
    torch.testing.assert_close(
        symmetric.detach(),
        F.similarity_matrix([x.detach(), y.detach(), z.detach()], measure=measure),
        atol=1e-12,
        rtol=0,
    )


def test_float32_input_gets_a_float32_gradient_and_one_side_may_be_constant_data():
    x = torch.randn(30, 6, requires_grad=True)
    teacher = torch.randn(30, 4)  # no grad: only the student side learns
    F.linear_cka(x, teacher).backward()
    assert x.grad is not None and x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()


def test_no_grad_context_gives_no_graph():
    x, y = _inputs()
    with torch.no_grad():
        assert not F.linear_cka(x, y).requires_grad


def test_degenerate_layer_with_grad_is_nan_with_the_engine_warning():
    x, _ = _inputs()
    constant = torch.ones(12, 3, dtype=torch.float64, requires_grad=True)
    with pytest.warns(match="zero variance"):
        assert torch.isnan(F.linear_cka(x, constant))


@pytest.mark.parametrize("measure", ["svcca", "pwcca"])
def test_cca_family_refuses_an_input_that_requires_grad(measure):
    x, y = _inputs()
    with pytest.raises(RepSimValueError, match=f"{measure} does not propagate gradients.*detach"):
        getattr(F, measure)(x, y)
    with pytest.raises(RepSimValueError, match="does not propagate gradients"):
        F.similarity_matrix([x], [y.detach()], measure)
    with pytest.raises(RepSimValueError, match="canonical_correlations does not propagate"):
        F.canonical_correlations(x, y)
    assert torch.isfinite(getattr(F, measure)(x.detach(), y.detach()))  # detached, as the message says


def _readme_example() -> str:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- readme-cka-loss.*?-->\s*```python\n(.*?)```", readme, re.S)
    assert block, "the README lost its 'CKA as a loss term' example"
    return block.group(1)


def test_readme_cka_loss_example_trains(capsys):
    namespace: dict[str, object] = {}
    exec(compile(_readme_example(), "README.md:cka-loss", "exec"), namespace)
    losses = namespace["losses"]
    assert isinstance(losses, list) and len(losses) == 20
    assert all(b < a for a, b in zip(losses, losses[1:5])), losses  # decreases from the first steps
    assert losses[-1] < 0.5 * losses[0]
    assert "1 - CKA:" in capsys.readouterr().out
