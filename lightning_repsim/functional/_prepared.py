"""Each layer prepared once for the Gram engine (private): features centred or not, scaled into
float32's safe range, their squared norms, and the n x n Grams cached within a memory budget.

Rows are examples. :class:`~lightning_repsim.functional._engine.Representations` keeps one
:class:`PreparedLayers` per (centring, device, product dtype); the engine computes every pair of
layers from them (see :mod:`lightning_repsim.functional._engine`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lightning_repsim.functional._validation import (
    finite_or_zero,
    gemm_dtype,
    no_autocast,
    self_product,
)
from lightning_repsim.functional.gram import squared_distances
from lightning_repsim.measures import GramSpec


@dataclass
class GramBudget:
    """Bytes of untransformed Grams that may still be cached (shared by a Representations' variants)."""

    bytes_left: int = 0


def quiet() -> np.errstate:
    """Overflow and NaN in NumPy's float64 work are reported once, as degenerate layers, not as RuntimeWarnings."""
    return np.errstate(over="ignore", invalid="ignore", divide="ignore")


def host_route(device: torch.device) -> bool:
    """Whether layers on ``device`` are prepared and multiplied through NumPy (CPU), rather than by the
    torch operations that run on accelerators (tests force the latter on CPU to check it there)."""
    return device.type == "cpu"


#: Entries of float32 products are kept within [2**-40, 2**40] in magnitude: then neither a Gram
#: entry (a sum of up to 2**20 squares) overflows nor a product of two entries underflows.
_FLOAT32_RANGE = (2.0**-40, 2.0**40)


#: A float32 layer whose squared column means exceed this multiple of its variance (mean / spread
#: beyond ~64) is centred again with an exact float64 mean (see PreparedLayers._float32_gram).
_FAR_MEAN = 2.0**12


def _column_mean_float32(raw: np.ndarray, block: int = 16) -> np.ndarray:
    """Column means of a float32 matrix to a few float32 ulps, 2x faster than a float64
    accumulation: float32 sums over blocks of ``block`` rows, then the block sums in float64."""
    n, p = raw.shape
    whole = n - n % block
    sums = np.add.reduce(raw[:whole].reshape(-1, block, p), axis=1).sum(0, dtype=np.float64)
    if whole < n:
        sums += raw[whole:].sum(0, dtype=np.float64)
    return sums / n


def _peak(x: np.ndarray) -> float:
    """The largest |entry| of a layer."""
    return float(np.abs(x).max())


def float32_scale(peak: float) -> float:
    """The power of two that brings a layer's largest |entry| (``peak``, in float64) into float32
    products' safe range: 1.0 when it already is there, or when the layer is zero or not finite.
    Every measure is invariant to a layer's scale; the layer's norms and energy are scaled with it."""
    low, high = _FLOAT32_RANGE
    if not math.isfinite(peak) or peak == 0.0 or low <= peak <= high:
        return 1.0
    return math.ldexp(1.0, -math.frexp(peak)[1])  # the peak lands in [0.5, 1)


class PreparedLayers:
    """Per-layer statistics, computed on first use and then shared by every pair and every call.

    ``features[i]`` is layer i in the product dtype (float64 on CPU, float32 on accelerators unless
    ``product_dtype`` says otherwise), centred in float64 when the spec says so; ``row_norms``
    (L, n) the squared norms of its rows; ``energy`` (L,) ``(||X||_F²)²`` of the raw input, the
    scale for "is it zero?". On CPU the Gram route asks for none of the features: it
    centres each layer in one scratch buffer, forms its Gram there and reads the rows' norms off the
    Gram's diagonal, so no float64 copy of the stack is made (nor its pages faulted in) unless the
    feature route or RBF needs it.
    """

    def __init__(
        self,
        names: list[str],
        sources: list[torch.Tensor],
        center: bool,
        device: torch.device,
        product_dtype: torch.dtype | str | None = None,
    ) -> None:
        self.names, self.sources, self.center = names, sources, center
        self.device = torch.device(device)
        self.product_dtype = gemm_dtype(self.device, product_dtype)
        self.n = sources[0].shape[0]
        self.widths = [int(m.shape[1]) for m in sources]
        self.problems: dict[str, str] = {}
        self.budget = GramBudget()  # Grams kept for later calls, within this
        self._features: list[torch.Tensor | None] = [None] * len(names)
        self._row_norms = torch.zeros(len(names), self.n, dtype=torch.float64, device=self.device)
        self._energy = torch.zeros(len(names), dtype=torch.float64, device=self.device)
        self._known = [False] * len(names)  # row norms and energy of layer i filled in
        self._scales: list[float | None] = [None] * len(names)  # float32 products: see float32_scale
        self._grams: dict[tuple[str, int], torch.Tensor] = {}
        self._self_cross: torch.Tensor | None = None

    def feature(self, i: int) -> torch.Tensor:
        """Layer i's prepared features (kept once computed)."""
        if self._features[i] is None:
            if host_route(self.device):
                for _ in range(2):  # a second time, zeroed, if the input turns out to hold NaN or Inf
                    with quiet():
                        x, extra = self._centred_cpu(i)
                        if self.product_dtype == torch.float32:
                            scale = self._decide_scale(i, functools.partial(_peak, x))
                            if scale != 1.0:
                                x, extra = self._centred_cpu(i, scale=scale)
                        norms = np.einsum("ij,ij->i", x, x)
                    if self._record(i, norms, float(norms.sum()) + extra):
                        break
                feature = torch.from_numpy(x).to(self.product_dtype)
            else:
                feature = self._prepare_torch(i)
            self._features[i] = feature
            return feature
        return self._features[i]  # type: ignore[return-value]  # set above

    @property
    def features(self) -> list[torch.Tensor]:
        return [self.feature(i) for i in range(len(self.names))]

    @property
    def row_norms(self) -> torch.Tensor:
        self._ensure_known()
        return self._row_norms

    @property
    def energy(self) -> torch.Tensor:
        self._ensure_known()
        return self._energy

    def _ensure_known(self) -> None:
        for i, known in enumerate(self._known):
            if not known:
                self.feature(i)

    def _prepare_torch(self, i: int) -> torch.Tensor:
        x, bad = finite_or_zero(self.sources[i].detach().to(device=self.device, dtype=torch.float64))
        if bad:
            self.problems[self.names[i]] = "it contains NaN or Inf"
        raw_norm = torch.linalg.vector_norm(x)
        if self.center:
            x = x - x.mean(0, keepdim=True)
        scale = self._decide_scale(i, lambda: float(x.abs().max())) if self.product_dtype == torch.float32 else 1.0
        if scale != 1.0:
            x = x * scale
        self._energy[i] = (raw_norm * scale) ** 4
        self._row_norms[i] = torch.linalg.vector_norm(x, dim=1) ** 2
        self._known[i] = True
        return x.to(self.product_dtype)

    def _raw_cpu(self, i: int) -> np.ndarray:
        mat = self.sources[i].detach().to("cpu")
        if mat.dtype not in (torch.float16, torch.float32, torch.float64):
            mat = mat.to(torch.float64)
        raw = mat.numpy()
        if self.names[i] in self.problems:  # found to hold NaN or Inf: zeroed, as on every device
            raw = np.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)
        return raw

    def _centred_cpu(
        self, i: int, scratch: np.ndarray | None = None, scale: float = 1.0, exact_mean: bool = True
    ) -> tuple[np.ndarray, float]:
        """(layer i, centred if asked, in float64 or in ``scratch`` (float64 or float32) when given;
        n ||mean||²).

        The mean is taken in float64. A float32 scratch subtracts it in two float32 parts (the
        rounded mean, then what rounding left of it), so no column keeps a residue of its mean: that
        residue would enter RV and RV2 at first order and CKA at second, visibly once the mean is
        1e4 times the spread. ``exact_mean=False`` lets a float32 input into a float32 scratch take
        the faster float32 mean and one subtraction instead; the caller checks the mean's size.
        ``scale`` (a power of two, for float32 products) multiplies the float64-centred layer, and
        the mean before the energy term is squared (its square alone may overflow or underflow).
        ``||raw||² = ||centred||² + n ||mean||²`` exactly, both sums of squares: the energy needs no
        pass of its own.
        """
        raw = self._raw_cpu(i)
        n, p = raw.shape
        if scratch is None and not self.center and scale == 1.0:
            return np.ascontiguousarray(raw, dtype=np.float64), 0.0
        x = np.empty((n, p)) if scratch is None else scratch[: n * p].reshape(n, p)
        if scale != 1.0:  # rare: built from float64, where the entries still have all their digits
            exact, mean = self._exact_centred(raw)
            np.multiply(exact, scale, out=x, casting="same_kind")
            return x, 0.0 if mean is None else n * float(np.dot(mean * scale, mean * scale))
        fast = not exact_mean and x.dtype == np.float32 and raw.dtype == np.float32
        if not self.center:
            mean = None
        elif fast:
            mean = _column_mean_float32(raw)
        else:
            mean = np.add.reduce(raw, axis=0, dtype=np.float64) / n
        if mean is None:
            np.copyto(x, raw, casting="same_kind")
        elif fast:
            np.subtract(raw, mean.astype(np.float32), out=x)
        elif x.dtype == np.float64:
            np.subtract(raw, mean, out=x)
        else:
            rounded = mean.astype(x.dtype)
            np.subtract(raw, rounded, out=x, casting="same_kind")
            x -= (mean - rounded).astype(x.dtype)
        return x, 0.0 if mean is None else n * float(np.dot(mean, mean))

    def _exact_centred(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``raw`` centred in float64 (``raw`` itself when not centring) and its float64 mean (None)."""
        if not self.center:
            return raw, None
        mean = np.add.reduce(raw, axis=0, dtype=np.float64) / raw.shape[0]
        return raw - mean, mean

    def _decide_scale(self, i: int, peak: Callable[[], float]) -> float:
        """Layer i's :func:`float32_scale`, decided once from its float64 ``peak`` and then kept, so
        that its norms, energy and Grams agree whichever path computes them."""
        decided = self._scales[i]
        if decided is None:
            value = peak()
            if not math.isfinite(value):
                return 1.0  # NaN or Inf input: zeroed and prepared again, then decided
            decided = self._scales[i] = float32_scale(value)
        return decided

    def _record(self, i: int, norms: np.ndarray, squares: float) -> bool:
        """Store layer i's row norms and energy; False (and the layer marked) if its input is not finite."""
        if not math.isfinite(squares) and self.names[i] not in self.problems:
            if not bool(np.isfinite(self._raw_cpu(i)).all()):
                self.problems[self.names[i]] = "it contains NaN or Inf"
                return False
        self._row_norms[i] = torch.from_numpy(norms)
        self._energy[i] = squares * squares
        self._known[i] = True
        return True

    def gram(
        self, i: int, kernel: str, out: torch.Tensor | None = None, scratch: GramScratch | None = None
    ) -> tuple[torch.Tensor, bool]:
        """Layer i's untransformed n x n float64 Gram (squared distances for ``rbf``), and whether it is
        cached (then the caller must not modify it in place).

        ``out`` (CPU, float64, n x n, contiguous): the Gram is written there and ``out`` is returned,
        never cached itself (a cached copy is kept when the budget allows), so the caller may modify it.
        ``scratch`` (CPU, with ``out``): buffers where a linear layer whose features were never asked
        for is centred and multiplied on its way to the Gram, instead of new copies.
        """
        cached = self._grams.get((kernel, i))
        if cached is not None:
            if out is None:
                return cached, True
            out.copy_(cached)
            return out, False
        if kernel == "rbf":
            gram = squared_distances(self.feature(i), self.product_dtype)
            if out is not None:
                gram = out.copy_(gram)
        elif out is not None and scratch is not None and self._features[i] is None:
            gram = self._streamed_gram(i, out, scratch)
        elif out is not None and self.product_dtype == out.dtype:
            gram = self_product(self.feature(i), out=out)
        else:
            gram = self_product(self.feature(i)).to(torch.float64)
            if out is not None:
                gram = out.copy_(gram)
        size = gram.numel() * gram.element_size()
        if size <= self.budget.bytes_left:
            self._grams[(kernel, i)] = gram if out is None else gram.clone()
            self.budget.bytes_left -= size
            return gram, out is None
        return gram, False

    def _streamed_gram(self, i: int, out: torch.Tensor, scratch: GramScratch) -> torch.Tensor:
        with quiet():
            for _ in range(2):  # a second time, zeroed, if the input turns out to hold NaN or Inf
                if scratch.product is None:
                    x, extra = self._centred_cpu(i, scratch.features)
                    self_product(torch.from_numpy(x), out=out)
                else:
                    extra = self._float32_gram(i, out, scratch)
                if self._known[i]:
                    break
                norms = out.numpy().diagonal().copy()
                if self._record(i, norms, float(norms.sum()) + extra):
                    break
        return out

    def _float32_gram(self, i: int, out: torch.Tensor, scratch: GramScratch) -> float:
        """Layer i's Gram by float32 products into ``out`` (float64); returns n ||mean||² (scaled).

        The layer is first centred the fast way (float32 mean, one subtraction). That leaves each
        column a residue of a few ulps of its mean, harmless (below 1e-7) while the means stay
        within ~64 spreads; beyond that, told by the Gram's trace (the centred variance), it is
        centred again exactly. Its scale is decided only when the Gram's diagonal (the rows' squared
        norms) leaves [2**-60, 2**100] or is not finite: otherwise the layer is safely within
        float32's range and needs no float64 pass to find its peak.
        """
        assert scratch.product is not None  # float32 products have a float32 scratch
        product = scratch.product[: self.n * self.n].reshape(self.n, self.n)
        exact = False
        for _ in range(3):
            decided = self._scales[i]
            scale = 1.0 if decided is None else decided
            x, extra = self._centred_cpu(i, scratch.features, scale, exact_mean=exact)
            self_product(torch.from_numpy(x), out=torch.from_numpy(product))
            if not exact and extra > _FAR_MEAN * float(product.diagonal().sum(dtype=np.float64)):
                exact = True
                continue
            np.copyto(out.numpy(), product)
            if self._scales[i] is not None:
                break
            largest = float(product.diagonal().max())
            if 2.0**-60 <= largest <= 2.0**100:
                self._scales[i] = 1.0
                break

            exact_peak = lambda: float(np.abs(self._exact_centred(self._raw_cpu(i))[0]).max())
            if self._decide_scale(i, exact_peak) == 1.0:
                break
        return extra

    def self_cross(self) -> torch.Tensor:
        """``||X_iᵀ X_i||_F²`` for every layer (feature space), computed once."""
        if self._self_cross is None:
            self._self_cross = torch.stack([squared_cross_norms([f], [f], True)[0, 0] for f in self.features])
        return self._self_cross


@dataclass
class GramScratch:
    """Reusable CPU buffers for streaming layers into Grams: ``features`` (at least n p_max, in the
    product dtype) receives each centred layer; ``product`` (n², float32) the Gram when the products
    are float32, before it is widened into its float64 row (None for float64 products)."""

    features: np.ndarray
    product: np.ndarray | None

    @classmethod
    def for_layers(cls, layers: PreparedLayers) -> GramScratch:
        dtype = np.float32 if layers.product_dtype == torch.float32 else np.float64
        product = np.empty(layers.n * layers.n, dtype=np.float32) if dtype == np.float32 else None
        return cls(np.empty(layers.n * max(layers.widths), dtype=dtype), product)


def prepare_layers(
    names: list[str],
    mats: list[torch.Tensor],
    spec: GramSpec,
    device: torch.device,
    product_dtype: torch.dtype | str | None = None,
) -> PreparedLayers:
    """The layers' :class:`PreparedLayers` for ``spec`` on ``device``: nothing is computed until asked for."""
    return PreparedLayers(names, mats, spec.center_features, device, product_dtype)


def squared_cross_norms(xs: list[torch.Tensor], ys: list[torch.Tensor], symmetric: bool) -> torch.Tensor:
    """``out[i, j] = ||xs[i]ᵀ ys[j]||_F²`` from one GEMM per x-layer against all y-layers.

    With ``symmetric`` (ys is xs) only the upper triangle is multiplied and mirrored.
    """
    device = xs[0].device
    stacked_y = torch.cat(ys, dim=1)
    sizes = torch.tensor([y.shape[1] for y in ys], device=device)
    owner = torch.repeat_interleave(torch.arange(len(ys), device=device), sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    out = torch.zeros(len(xs), len(ys), dtype=torch.float64, device=device)
    with no_autocast(device):
        for i, x in enumerate(xs):
            first = int(starts[i]) if symmetric else 0
            column_sums = (x.T @ stacked_y[:, first:]).to(torch.float64).square().sum(0)
            out[i].index_add_(0, owner[first:], column_sums)
    if symmetric:
        out = out.triu() + out.triu(1).T
    return out
