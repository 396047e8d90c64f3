"""A CPU stand-in for CUDA graph capture, for tests of the graph path without a GPU: a replay
re-runs the captured forward on the same static buffers and copies into one static output, as a
graph replay does."""

from __future__ import annotations

from collections.abc import Callable

import torch


class StaticReplayCapturer:
    """Replay = run the captured forward again and copy into the output made at capture."""

    def __init__(self) -> None:
        self.replayed_sizes: list[int] = []
        self.replayed_graphs: list[int] = []  # each replay's graph, numbered in capture order
        self.num_captured = 0
        # Whether each capture ran under inference mode (a graph captured with autograd on would
        # keep every layer's activations alive in its memory pool).
        self.captured_in_inference_mode: list[bool] = []

    def capture(self, forward: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        self.captured_in_inference_mode.append(torch.is_inference_mode_enabled())
        static = forward()
        number = self.num_captured
        self.num_captured += 1

        def replay() -> torch.Tensor:
            static.copy_(forward())
            self.replayed_sizes.append(static.shape[0])
            self.replayed_graphs.append(number)
            return static

        return replay
