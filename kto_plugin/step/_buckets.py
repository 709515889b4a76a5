"""Little compute on padding in the no-grad passes: their rows run in groups of similar length.

A right-padded batch costs its row count times its longest row. The KTO batches are uneven (a KL row pairs a
long prompt with another row's long completion; one long completion pads every row of a completion pass), so the
no-grad passes (`_passes`, `_shared_prompt`) split their rows into groups by length and run each group padded to
its own longest row. The Trainer's own forward of the target batch is left as the Trainer collates it.

`length_groups` picks the split that minimises ``sum over groups of (overhead + rows * longest)``: `overhead` is
the cost of one more forward call, in tokens (on the CPU a call costs about what a few dozen tokens do; on an
accelerator, many more). Each group is cut to its own width, so the result is the same as one padded call's up
to float rounding (padding never changes a real token's values: it is masked).

Whether the passes use groups is `KTOConfig.length_buckets` (`use_buckets`): ``"auto"`` groups on the CPU, where
it was measured to pay off (docs/performance.md), and not on accelerators, where it was not measured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from ._logprobs import SequenceLogps

# the cost of one forward call, in tokens of the padded batch (see `length_groups`)
CPU_CALL_OVERHEAD = 64
ACCELERATOR_CALL_OVERHEAD = 1024


def use_buckets(setting: str, device: torch.device) -> bool:
    """`KTOConfig.length_buckets` on `device`: "on", "off", or "auto" (on for the CPU only)."""
    if setting == "auto":
        return device.type == "cpu"
    return setting == "on"


def length_groups(lengths: Sequence[int], overhead: int) -> list[list[int]]:
    """Rows (indices into `lengths`) in groups of similar length, minimising ``sum(overhead + rows * longest)``.

    An exact split of the rows sorted by length (dynamic programming over the cut points, O(n^2) for n rows).

    >>> length_groups([10, 300, 12, 290], overhead=64)
    [[0, 2], [3, 1]]
    >>> length_groups([10, 300, 12, 290], overhead=10_000)
    [[0, 2, 3, 1]]
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sorted_lengths = [lengths[i] for i in order]
    best = [0.0] + [float("inf")] * len(order)
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end):
            cost = best[start] + overhead + (end - start) * sorted_lengths[end - 1]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(order)
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


def row_groups(lengths: torch.Tensor, bucketed: bool) -> list[tuple[torch.Tensor | slice, int]]:
    """``(rows, width)`` per group: the group's rows (a slice of all rows when there is one group) and its longest
    length. `lengths`: (B,) the tokens each row needs."""
    listed = lengths.tolist()
    overhead = CPU_CALL_OVERHEAD if lengths.device.type == "cpu" else ACCELERATOR_CALL_OVERHEAD
    groups = length_groups(listed, overhead) if bucketed else [list(range(len(listed)))]
    if len(groups) == 1:
        return [(slice(None), max(listed, default=0))]
    return [(torch.tensor(g, device=lengths.device), max(listed[i] for i in g)) for g in groups]


def run_grouped(
    lengths: torch.Tensor, bucketed: bool, run: Callable[[torch.Tensor | slice, int], SequenceLogps]
) -> SequenceLogps:
    """Per-row results of `run(rows, width)` over `row_groups`, put back in row order (`run` returns
    `SequenceLogps` for its rows, in their order; per-token fields with the same width for every group)."""
    groups = row_groups(lengths, bucketed)
    if len(groups) == 1:
        return run(*groups[0])
    parts = [run(rows, width) for rows, width in groups]
    index = torch.cat([rows for rows, _ in groups])

    def merged(field: str) -> torch.Tensor | None:
        values = [getattr(part, field) for part in parts]
        if any(v is None for v in values):
            return None
        joined = torch.cat(values)
        return joined.new_zeros((lengths.shape[0], *joined.shape[1:])).index_copy(0, index.to(joined.device), joined)

    return SequenceLogps(**{field.name: merged(field.name) for field in dataclasses.fields(SequenceLogps)})
