"""The probe set: fixed model inputs, materialised once on the CPU, hashed, moved to each device once."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from lightning_repsim.capture.outputs import first_tensor
from lightning_repsim.errors import RepSimValueError

__all__ = ["Probe"]


class Probe:
    """A fixed set of probe inputs, materialised once on the CPU and hashed.

    Rows (dim 0) are examples. Accepted sources:

    * a tensor;
    * an ``(x, y)`` tuple (``x`` is used);
    * a list of tensors — batches, concatenated along dim 0;
    * a ``DataLoader`` over a map-style dataset with its default sampler, shuffling or not:
      the first ``max_examples`` examples *of the dataset*, in index order, collated by the
      loader's ``collate_fn``. A shuffling loader thus gives the same probe in every fit, on
      resume and across runs (for the sequential sampler it is the loader's own order);
    * any other iterable of batches (an iterable dataset, a custom sampler): iterated once.

    Of each batch, the tensor itself, or its first element when it is a tuple / list
    (``(x, y)`` batches), or its ``"input"`` / ``"x"`` / first tensor value when it is a
    mapping. The global CPU RNG state is restored afterwards, so building a probe does not
    shift training's random stream.

    Args:
        data: one of the sources above, or another :class:`Probe` (copied).
        max_examples: keep only the first ``max_examples`` examples (stops iterating early).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> x = torch.arange(12.0).reshape(6, 2)
        >>> loader = DataLoader(TensorDataset(x, torch.zeros(6)), batch_size=4)
        >>> probe = Probe(loader, max_examples=5)
        >>> len(probe), probe.inputs.shape
        (5, torch.Size([5, 2]))
        >>> [b.shape[0] for b in probe.batches(2)]
        [2, 2, 1]
        >>> probe.hash == Probe(x[:5]).hash
        True
    """

    def __init__(self, data: Any, *, max_examples: int | None = None) -> None:
        if max_examples is not None and (not isinstance(max_examples, int) or max_examples < 1):
            raise RepSimValueError(f"max_examples must be a positive int, got {max_examples!r}.")
        inputs = self._materialise(data, max_examples)
        if inputs.ndim == 0:
            raise RepSimValueError("A probe needs a batch dimension; got a 0-d tensor.")
        if max_examples is not None:
            inputs = inputs[:max_examples]
        if inputs.shape[0] == 0:
            raise RepSimValueError("The probe set is empty.")
        self._inputs = inputs.detach().cpu().contiguous()
        self._on_device: dict[torch.device, torch.Tensor] = {}
        self._hash: str | None = None

    @staticmethod
    def _batch_inputs(batch: Any) -> torch.Tensor:
        if isinstance(batch, torch.Tensor):
            return batch
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
            return batch[0]
        if isinstance(batch, Mapping):
            for key in ("input", "inputs", "x"):
                if isinstance(batch.get(key), torch.Tensor):
                    return batch[key]
            found = first_tensor(batch)
            if found is not None:
                return found
        raise RepSimValueError(
            f"Cannot find the inputs in a probe batch of type {type(batch).__name__}; pass a "
            "tensor, (x, y) batches, or materialise the inputs yourself."
        )

    @classmethod
    def _materialise(cls, data: Any, max_examples: int | None) -> torch.Tensor:
        if isinstance(data, Probe):
            return data.inputs
        if isinstance(data, torch.Tensor):
            return data
        if isinstance(data, tuple) and data and isinstance(data[0], torch.Tensor):
            return data[0]
        if isinstance(data, list) and data and all(isinstance(t, torch.Tensor) for t in data):
            return torch.cat([t.detach().cpu() for t in data])
        if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
            raise RepSimValueError(
                f"Cannot build a probe set from {type(data).__name__}; pass a tensor, an "
                "(x, y) tuple, a list of tensors or a DataLoader."
            )
        chunks, count = [], 0
        # iterating a DataLoader draws a seed from the global RNG: keep the training stream intact
        with torch.random.fork_rng(devices=[]):
            from_dataset = cls._from_dataset(data, max_examples)
            if from_dataset is not None:
                return from_dataset
            for batch in data:
                x = cls._batch_inputs(batch).detach().cpu()
                chunks.append(x)
                count += x.shape[0]
                if max_examples is not None and count >= max_examples:
                    break
        if not chunks:
            raise RepSimValueError("The probe data loader yielded no batches.")
        return torch.cat(chunks)

    @classmethod
    def _from_dataset(cls, loader: Any, max_examples: int | None) -> torch.Tensor | None:
        """The first examples of a DataLoader's map-style dataset in index order (None: not such a loader)."""
        from torch.utils.data import DataLoader, IterableDataset, RandomSampler, SequentialSampler

        if not isinstance(loader, DataLoader) or loader.batch_size is None:
            return None
        if isinstance(loader.dataset, IterableDataset) or type(loader.sampler) not in (
            SequentialSampler,
            RandomSampler,
        ):
            return None
        try:
            size = len(loader.dataset)  # type: ignore[arg-type]
        except TypeError:
            return None
        count = size if max_examples is None else min(size, max_examples)
        chunks = []
        for start in range(0, count, loader.batch_size):
            items = [loader.dataset[i] for i in range(start, min(count, start + loader.batch_size))]
            chunks.append(cls._batch_inputs(loader.collate_fn(items)).detach().cpu())
        return torch.cat(chunks) if chunks else None

    @property
    def inputs(self) -> torch.Tensor:
        """The probe inputs, ``(n, *)``, on the CPU."""
        return self._inputs

    def __len__(self) -> int:
        return self._inputs.shape[0]

    def __repr__(self) -> str:
        shape, dtype = tuple(self._inputs.shape), self._inputs.dtype
        return f"Probe(n={len(self)}, shape={shape}, dtype={dtype})"

    def to(self, device: torch.device | str) -> torch.Tensor:
        """The inputs on ``device``; copied once per device and cached."""
        device = torch.device(device)
        if device.type == "cpu":
            return self._inputs
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._on_device:
            self._on_device[device] = self._inputs.to(device)
        return self._on_device[device]

    @property
    def hash(self) -> str:
        """sha256 hex digest of dtype, shape and the raw bytes of the inputs.

        Deterministic across runs and (little-endian) machines for the same data; any change
        of a value, the shape or the dtype changes it.
        """
        if self._hash is None:
            digest = hashlib.sha256()
            header = f"lightning_repsim.Probe/v1|{self._inputs.dtype}|{tuple(self._inputs.shape)}|"
            digest.update(header.encode())
            flat = self._inputs.reshape(-1)
            if flat.dtype == torch.bool:
                flat = flat.to(torch.uint8)
            raw = flat.view(torch.uint8).numpy()
            step = 1 << 24
            for start in range(0, raw.shape[0], step):
                digest.update(raw[start : start + step].tobytes())
            self._hash = digest.hexdigest()
        return self._hash

    def batches(
        self, batch_size: int | None = None, device: torch.device | str | None = None
    ) -> Iterator[torch.Tensor]:
        """Consecutive slices of ``batch_size`` examples (all at once when None)."""
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise RepSimValueError(f"batch_size must be a positive int or None, got {batch_size!r}.")
        inputs = self._inputs if device is None else self.to(device)
        step = len(self) if batch_size is None else batch_size
        for start in range(0, len(self), step):
            yield inputs[start : start + step]
