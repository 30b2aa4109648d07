"""TensorBoard: tags, and a reporter that logs images, per-layer scalars and text.

Tag scheme (see :func:`make_tag` and :func:`scalar_tags`):

    ============================================  =========  ===================================
    tag                                           kind       content
    ============================================  =========  ===================================
    ``repsim/<measure>/<reference>/<NN>_<layer>`` scalar     similarity of one layer to its
                                                             counterpart in ``<reference>``;
                                                             ``NN``: depth, so tags sort as
                                                             the layers run (:func:`layer_tags`)
    ``repsim/<measure>/<reference>/heatmap``      image      all pairs of layers
    ``repsim/<measure>/final/convergence_map``    image      layer x step map (vs final snapshot)
    ``repsim/<measure>/final/curves``             image      one curve per layer
    ``repsim/<measure>/final/convergence_summary`` text      markdown table of convergence steps
    ============================================  =========  ===================================

    ``<reference>`` names what the network is compared with: ``init``, ``final``, ``seed1``,
    a checkpoint name... Each ``/``-separated component is passed through
    :func:`sanitize_tag`: characters other than letters, digits, ``_``, ``.`` and ``-`` become
    ``_``, so module names such as ``features.0`` or ``encoder.layers.3.mlp`` are kept verbatim
    while a ``/`` or a space inside a layer label cannot create a spurious TensorBoard group.
    Non-finite similarities are logged as NaN (never skipped), so that a degenerate layer
    shows up at the step where it happened instead of silently vanishing from the chart.
"""

from __future__ import annotations

import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lightning_repsim.errors import RepSimValueError, RepSimWarning
from lightning_repsim.report._common import figure_to_array
from lightning_repsim.report.figures import heatmap_figure
from lightning_repsim.report.files import _png_header, encode_png

__all__ = [
    "TensorBoardReporter",
    "accelerate_event_checksums",
    "log_comparison",
    "custom_scalars_layout",
    "layer_tags",
    "make_tag",
    "sanitize_tag",
    "scalar_tags",
]

_TAG_INVALID = re.compile(r"[^\w.\-]")
_DEFAULT_DPI = 100


def sanitize_tag(name: str) -> str:
    """Make one component of a TensorBoard tag: keep letters, digits, ``_``, ``.`` and ``-``.

    Every other character (``/``, spaces, brackets...) becomes ``_``; the empty name (the root
    module in ``named_modules()``) becomes ``_``. Module names are usually unchanged.

    Example:
        >>> sanitize_tag("features.0"), sanitize_tag("block 1/conv (3x3)"), sanitize_tag("")
        ('features.0', 'block_1_conv__3x3_', '_')
    """
    return _TAG_INVALID.sub("_", str(name)) or "_"


def make_tag(*parts: str) -> str:
    """Join tag parts with ``/``; each ``/``-separated component goes through
    :func:`sanitize_tag`.

    Raises:
        RepSimValueError: if a part has an empty component (``"a//b"``, a leading ``/``).

    Example:
        >>> make_tag("repsim/linear_cka", "init", "features.0")
        'repsim/linear_cka/init/features.0'
    """
    components = [c for part in parts for c in str(part).split("/")]
    if not components or any(c == "" for c in components):
        raise RepSimValueError(
            f"Tag parts {parts!r} contain an empty component; remove the doubled, leading or trailing '/'."
        )
    return "/".join(sanitize_tag(c) for c in components)


def scalar_tags(prefix: str, layer_names: Sequence[str]) -> dict[str, str]:
    """Map each layer name to its scalar tag ``f"{prefix}/{sanitize_tag(layer)}"``.

    The tags are stable across steps and runs. If two layer names sanitise to the same
    component (``"a b"`` and ``"a_b"``), later ones get ``_2``, ``_3``... appended, with one
    :class:`~lightning_repsim.errors.RepSimWarning`.

    Example:
        >>> scalar_tags("repsim/rv2/init", ["conv1", "fc"])
        {'conv1': 'repsim/rv2/init/conv1', 'fc': 'repsim/rv2/init/fc'}
    """
    base = make_tag(prefix)
    tags: dict[str, str] = {}
    used: set[str] = set()
    clashes: list[str] = []
    for name in layer_names:
        component = sanitize_tag(name)
        tag, k = f"{base}/{component}", 2
        while tag in used:
            tag, k = f"{base}/{component}_{k}", k + 1
        if k > 2:
            clashes.append(f"{name!r} -> {tag!r}")
        used.add(tag)
        tags[name] = tag
    if clashes:
        warnings.warn(
            "Layer names collide after tag sanitisation; renamed: "
            + ", ".join(clashes)
            + ". Give these layers distinct names to get clean tags.",
            RepSimWarning,
            stacklevel=2,
        )
    return tags


def layer_tags(prefix: str, layer_names: Sequence[str]) -> dict[str, str]:
    """Map each layer to a scalar tag that sorts by depth: ``f"{prefix}/{index:02d}_{layer}"``.

    TensorBoard (and most dashboards) order tags alphabetically; the zero-padded depth index keeps
    the layers in the order they run (``classifier.1`` after ``features.7``), and tells two layers
    whose names sanitise alike apart. The tags are stable across steps and runs of one architecture.

    Example:
        >>> layer_tags("repsim/rv2/init", ["features.0", "classifier.1"])
        {'features.0': 'repsim/rv2/init/00_features.0', 'classifier.1': 'repsim/rv2/init/01_classifier.1'}
    """
    base = make_tag(prefix)
    width = max(2, len(str(len(layer_names) - 1)))
    return {name: f"{base}/{i:0{width}d}_{sanitize_tag(name)}" for i, name in enumerate(layer_names)}


def custom_scalars_layout(charts: Mapping[str, Sequence[str]]) -> dict[str, dict[str, list[Any]]]:
    """A TensorBoard custom-scalars layout with one multi-line chart per tag prefix, grouped by category.

    ``charts`` maps a category (e.g. ``"repsim/linear_cka"``) to tag prefixes (``"repsim/linear_cka/init"``);
    each chart holds every scalar under its prefix, in tag order (depth order with :func:`layer_tags`).
    Pass the result to ``SummaryWriter.add_custom_scalars``.

    Example:
        >>> custom_scalars_layout({"repsim/rv2": ["repsim/rv2/init"]})
        {'repsim/rv2': {'init': ['Multiline', ['^repsim/rv2/init/']]}}
    """
    return {
        category: {prefix.rsplit("/", 1)[-1]: ["Multiline", [f"^{re.escape(prefix)}/"]] for prefix in prefixes}
        for category, prefixes in charts.items()
    }


def _torch_file_writer(writer: Any) -> Any:
    """The event-file writer of a ``torch.utils.tensorboard.SummaryWriter``, else ``None``
    (tensorboardX and duck-typed writers use their own protobuf classes)."""
    module = sys.modules.get("torch.utils.tensorboard.writer")
    if module is None or not isinstance(writer, module.SummaryWriter):
        return None
    get = getattr(writer, "_get_file_writer", None)  # what add_image uses; reopens a closed writer
    file_writer = get() if get is not None else getattr(writer, "file_writer", None)
    return file_writer if hasattr(file_writer, "add_summary") else None


_CRC_MASK_DELTA = 0xA282EAD8


def _masked_crc32c_c(data: bytes) -> int:
    """TFRecord's masked CRC-32C of ``data`` (rotate right by 15, add a constant), computed in C."""
    import google_crc32c

    crc = google_crc32c.value(bytes(data))
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def accelerate_event_checksums() -> bool:
    """Opt in to computing TensorBoard's event-record checksums in C, process-wide; returns whether it now does.

    tensorboard frames every event record with a masked CRC-32C that it computes byte by byte in
    pure Python: about 5 ms per 40 KB heatmap PNG, during which its writer thread holds the GIL and
    the training loop waits (BENCHMARKS.md measures what that costs a monitored run). With
    google-crc32c installed (``pip install lightning_repsim[fast]``), this replaces tensorboard's
    function by the same checksum computed in C, only when the C extension loaded and both agree on
    a test record, so the event files stay byte for byte what tensorboard would have written. The
    change is process-wide (every tensorboard writer of the process benefits), which is why the
    library never makes it by itself: call it once, before training, if you want it. It does not
    concern tensorboardX, which frames its records with its own code.

    Example:
        >>> from lightning_repsim.report import accelerate_event_checksums
        >>> accelerate_event_checksums() in (True, False)
        True
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # google_crc32c warns on import when it falls back to Python
            import google_crc32c
        from tensorboard.summary.writer import record_writer
    except Exception:  # not installed, or an import that fails in any other way: keep tensorboard's own
        return False
    current = getattr(record_writer, "masked_crc32c", None)
    if current is _masked_crc32c_c:
        return True
    if current is None or google_crc32c.implementation != "c":
        return False
    sample = bytes(range(256)) * 3 + b"lightning_repsim"
    if current(sample) != _masked_crc32c_c(sample):
        return False
    record_writer.masked_crc32c = _masked_crc32c_c
    return True


class TensorBoardReporter:
    """Write similarity heatmaps, per-layer scalars, text and convergence plots to TensorBoard.

    Wraps a :class:`torch.utils.tensorboard.SummaryWriter`, which is what Lightning's
    ``TensorBoardLogger.experiment`` returns; the logger itself is also accepted and unwrapped.
    Tags follow the scheme in this module's docstring; every tag passes through
    :func:`make_tag`. Only call it on global rank zero (Lightning's logger is a no-op dummy on
    other ranks anyway).

    Args:
        writer: a ``SummaryWriter`` (or anything with ``add_image``, ``add_scalar`` and
            ``add_text``), or a Lightning ``TensorBoardLogger``.
        dpi: resolution of the images (pixels per inch of figure).

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> with SummaryWriter(tempfile.mkdtemp()) as writer:
        ...     tb = TensorBoardReporter(writer)
        ...     tb.log_layer_scalars("repsim/linear_cka/init", {"conv1": 0.8, "fc": 0.3}, step=10)
        ['repsim/linear_cka/init/conv1', 'repsim/linear_cka/init/fc']
    """

    def __init__(self, writer: Any, *, dpi: int = _DEFAULT_DPI) -> None:
        if not hasattr(writer, "add_image") and hasattr(writer, "experiment"):
            writer = writer.experiment
        missing = [m for m in ("add_image", "add_scalar", "add_text") if not hasattr(writer, m)]
        if missing:
            raise RepSimValueError(
                f"{type(writer).__name__} is not a TensorBoard SummaryWriter (no "
                f"{', '.join(missing)}); pass `TensorBoardLogger.experiment` or a SummaryWriter."
            )
        self.writer = writer
        self.dpi = dpi

    def log_figure(self, tag: str, fig: Figure, step: int) -> np.ndarray:
        """Rasterise ``fig`` and log it as an image; returns the ``(H, W, 3)`` array."""
        image = figure_to_array(fig)
        self.log_png(tag, encode_png(image), step)
        return image

    def log_png(self, tag: str, png: bytes, step: int) -> None:
        """Log an image that is already PNG-encoded (from :func:`encode_png`) under ``tag``.

        With a ``torch.utils.tensorboard.SummaryWriter`` the bytes go into the event file as
        they are (an image ``Summary``, exactly what ``add_image`` writes, minus its own PNG
        encoding), so an image that is also saved with :func:`write_png_bytes` is encoded
        once. Other writers get the decoded array through ``add_image``.

        Raises:
            RepSimValueError: if ``png`` is not PNG data, or ``tag`` has an empty component.
        """
        height, width, channels = _png_header(png)
        tag = make_tag(tag)
        file_writer = _torch_file_writer(self.writer)
        if file_writer is None:
            import io

            from PIL import Image

            with Image.open(io.BytesIO(png)) as decoded:
                image = np.asarray(decoded.convert("RGBA" if channels in (2, 4) else "RGB"))
            self.writer.add_image(tag, image, global_step=int(step), dataformats="HWC")
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        summary = Summary(
            value=[
                Summary.Value(
                    tag=tag,
                    image=Summary.Image(
                        height=height, width=width, colorspace=channels, encoded_image_string=bytes(png)
                    ),
                )
            ]
        )
        file_writer.add_summary(summary, int(step))

    def log_heatmap(
        self,
        tag: str,
        matrix: Any,
        row_labels: Sequence[Any],
        col_labels: Sequence[Any],
        *,
        measure: str,
        step: int,
        **figure_kwargs: Any,
    ) -> np.ndarray:
        """Log :func:`heatmap_figure` as an image under ``tag`` (e.g.
        ``repsim/linear_cka/init/heatmap``); extra keywords go to :func:`heatmap_figure`.

        Returns:
            The logged ``(H, W, 3)`` ``uint8`` image.
        """
        fig = heatmap_figure(matrix, row_labels, col_labels, measure=measure, dpi=self.dpi, **figure_kwargs)
        return self.log_figure(tag, fig, step)

    def log_layer_scalars(self, prefix: str, values: Mapping[str, float], step: int) -> list[str]:
        """Log one scalar per layer under ``f"{prefix}/{layer}"`` (see :func:`scalar_tags`).

        ``prefix`` is normally ``repsim/<measure>/<reference>``. Non-finite values are logged
        as they are (NaN stays NaN), so a degenerate layer is visible at its step.

        Returns:
            The tags written, in the order of ``values``.
        """
        tags = scalar_tags(prefix, list(values))
        for name, value in values.items():
            self.writer.add_scalar(tags[name], float(value), global_step=int(step))
        return list(tags.values())

    def log_text(self, tag: str, markdown: str, step: int) -> None:
        """Log markdown text (TensorBoard's text plugin renders it, tables included).

        TensorBoard stores it as a tensor under ``tag + "/text_summary"``.
        """
        self.writer.add_text(make_tag(tag), markdown, global_step=int(step))

    def flush(self) -> None:
        """Flush the underlying writer to disk."""
        if hasattr(self.writer, "flush"):
            self.writer.flush()


def log_comparison(
    log_dir: Any,
    matrices: Mapping[str, Any],
    layers_a: Sequence[str],
    layers_b: Sequence[str],
    *,
    names: tuple[str, str],
    step: int,
    probe_hash: str,
    n: int,
) -> None:
    """Write a comparison of two runs as a TensorBoard run in ``log_dir``, to open beside the training runs.

    Per measure: the heatmap ``repsim/<measure>/<run B>/heatmap`` and, for layers named alike in both
    runs, the scalars ``repsim/<measure>/<run B>/<layer>``; the text ``repsim/compare`` says which runs
    and probe.
    """
    from torch.utils.tensorboard import SummaryWriter

    label = sanitize_tag(names[1])
    index_b = {name: j for j, name in enumerate(layers_b)}
    with SummaryWriter(log_dir=str(log_dir)) as writer:
        tb = TensorBoardReporter(writer)
        for measure, values in matrices.items():
            prefix = f"repsim/{measure}/{label}"
            tb.log_heatmap(
                f"{prefix}/heatmap",
                values,
                layers_a,
                layers_b,
                measure=measure,
                step=step,
                row_title=names[0],
                col_title=names[1],
            )
            diagonal = {name: float(values[i, index_b[name]]) for i, name in enumerate(layers_a) if name in index_b}
            if diagonal:
                tb.log_layer_scalars(prefix, diagonal, step)
        tb.log_text(
            "repsim/compare", f"`{names[0]}` (rows) vs `{names[1]}` (columns), probe hash `{probe_hash}`, n = {n}", step
        )
