"""Host -> device copies one batch ahead of the train step (CUDA); a passthrough on CPU.

The next batch is copied from pinned memory with non-blocking copies on a side stream while the current
step runs; the compute stream waits for that copy before it touches the batch. The loader's position stays
exact: the prefetcher tells the loader iterator how many batches it holds that the caller has not seen yet.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


class DevicePrefetcher:
    def __init__(self, loader_iter: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device | str):
        self.device = torch.device(device)
        self.source = iter(loader_iter)
        self._hold = getattr(self.source, "hold_ahead", None)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._stream is None:
            yield from self.source
            return
        pending = self._fetch()
        while pending is not None:
            following = self._fetch()
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
            for tensor in pending:
                tensor.record_stream(torch.cuda.current_stream(self.device))
            self._set_held(1 if following is not None else 0)
            yield pending
            pending = following
        self._set_held(0)

    def _fetch(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            images, labels = next(self.source)
        except StopIteration:
            return None
        with torch.cuda.stream(self._stream):
            return self._copy(images), self._copy(labels)

    def _copy(self, tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_pinned():
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def _set_held(self, batches: int) -> None:
        if self._hold is not None:
            self._hold(batches)

