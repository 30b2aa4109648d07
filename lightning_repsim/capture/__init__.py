"""Which modules, in which order, and how their outputs become ``(n, p)`` features.

Conventions, everywhere in lightning_repsim: **rows are examples, columns are neurons**. A
layer's output for ``n`` probe examples becomes one ``(n, p)`` matrix, float32 (float64 when
the layer itself computes in float64), detached, on the model's device.

The pipeline, one function each, one module per step:

* :mod:`~lightning_repsim.capture.layers` — :func:`execution_order` (module paths in the order
  they first run in a forward pass) and :func:`select_layers` (names, glob patterns or module
  types: classes or import paths such as ``"torch.nn.Linear"``, kept in execution order).
* :mod:`~lightning_repsim.capture.blocks` — :func:`default_blocks`, the blocks people reason about
  (repeated transformer / ResNet blocks, a conv or linear with the norm and activation after it,
  embeddings, heads): the default layers of the monitor and the default units of freezing.
* :mod:`~lightning_repsim.capture.outputs` — :func:`select_output` (which tensor of a module's
  output: tuple, dict, dataclass, RNN) and :func:`reduce_output` (one rule for every layer that
  maps ``(N, *)`` to ``(N, p)``).
* :mod:`~lightning_repsim.capture.probe` — :class:`Probe`, the fixed, hashed set of probe inputs.
* :mod:`~lightning_repsim.capture.recorder` — :func:`capture`, all of the above in one no-grad,
  eval-mode pass with temporary hooks.

The reduction rule (:func:`reduce_output`):

* ``(N,)`` → ``(N, 1)``; ``(N, p)`` → as is.
* conv layout, ``(N, C, *S)`` with 1 to 3 (or more) spatial dims: if ``C * prod(S) <=
  max_features`` flatten as is; otherwise adaptive average pooling to the largest common side
  ``s`` (each spatial dim pooled to ``min(s, S_d)``, never upsampled) with ``C * prod(...) <=
  max_features``, then flatten (channel-major). When even global pooling is too wide
  (``C > max_features``) global average pooling is kept (``p = C``) with one
  :class:`~lightning_repsim.errors.RepSimWarning` naming the layer.
* tokens layout, ``(N, T, *D)``: ``token_reduction`` ``"mean"`` over tokens (default),
  ``"first"`` / ``"last"`` token, or ``"flatten"`` to ``(N, T * D)``.
* ``layout="auto"`` decides conv vs tokens per module: 4-D and higher outputs are conv maps;
  3-D outputs are tokens for the known sequence modules (``nn.MultiheadAttention``,
  ``nn.Transformer*``, ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``, ``nn.Embedding``) and for modules
  that act on the last axis (``nn.Linear``, ``nn.Bilinear``, ``nn.LayerNorm``, ``nn.RMSNorm``:
  a transformer's layers), and conv maps for everything else (``nn.Conv1d``, 1-d batch norms
  and pooling, and any other module). Pass ``layout="tokens"`` (or a per-layer mapping) for
  other modules of a transformer, e.g. parameter-free activations.
* Rows are examples. Sequence modules with ``batch_first=False`` have their ``(T, N, D)``
  outputs transposed to ``(N, T, D)`` first, whatever the layout; so has any other 3-D
  output whose second axis, not its first, has the batch's size (the inner layers of a
  sequence-first model). Each layer's reading is decided once per capture, by a batch
  whose size differs from the sequence length; when every batch is as long as the
  sequence, the layers inside a ``batch_first=False`` module are read as ``(T, N, D)``
  and all others as ``(N, T, D)`` (a hand-written sequence-first model then needs a
  ``batch_size`` other than its sequence length). An output with no axis of the batch's
  size in front cannot be read as one row per example: such a layer is left out with a
  warning when chosen by default, and is an error when selected explicitly.
"""

from lightning_repsim.capture.blocks import Block, default_blocks
from lightning_repsim.capture.layers import (
    LayerSelector,
    eval_mode,
    execution_order,
    name_matches,
    select_layers,
    select_names,
    top_level_blocks,
)
from lightning_repsim.capture.outputs import OutputSelector, reduce_output, select_output
from lightning_repsim.capture.probe import Probe
from lightning_repsim.capture.recorder import capture, capture_blocks

__all__ = [
    "Block",
    "LayerSelector",
    "OutputSelector",
    "Probe",
    "capture",
    "capture_blocks",
    "default_blocks",
    "eval_mode",
    "execution_order",
    "name_matches",
    "reduce_output",
    "select_layers",
    "select_names",
    "select_output",
    "top_level_blocks",
]
