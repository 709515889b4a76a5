"""The KL pairing rule: which completion each prompt meets in the mismatched (KL) batch.

KTO's reference point z0 is estimated from pairs (prompt i, completion j != i) (paper section 4.1). The rule,
used by the collator (within each batch), the vision collator and the precompute pass (within groups of the
batch size, so a stored partner is the one the collator would have built under a sequential sampler): each row
takes the completion of the row before it within its group, the group's first row the group's last (TRL 1.16's
rotation by one).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def kl_partners(num_rows: int, group_size: int) -> np.ndarray:
    """The KL partner of each row: the previous row within consecutive groups of `group_size` rows.

    A trailing group of one row is paired with the row before it (a row paired with itself is no mismatch).

    >>> kl_partners(7, 3).tolist()   # groups [0 1 2] [3 4 5] [6]
    [2, 0, 1, 5, 3, 4, 5]
    >>> kl_partners(3, 3).tolist()   # one batch: prompt i meets completion i - 1
    [2, 0, 1]
    """
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    idx = np.arange(num_rows)
    start = idx - idx % group_size
    size = np.minimum(group_size, num_rows - start)
    partners = start + (idx - start - 1) % size
    if num_rows >= 2 and size[-1] == 1:
        partners[-1] = num_rows - 2
    return partners


def kl_pairs(items: Sequence[T]) -> list[T]:
    """`items` rearranged so that position i holds its KL partner's item (one group: the whole batch).

    >>> kl_pairs(["a", "b", "c"])
    ['c', 'a', 'b']
    """
    return [items[j] for j in kl_partners(len(items), max(len(items), 1))]
