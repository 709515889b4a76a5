"""The reference model: where reference log-probs come from, without ever touching the policy.

``_manager`` (`ReferenceManager`: a separate model, a frozen copy, a PEFT adapter switched in, or the base model
with adapters off), ``_adapters`` (PEFT adapters seen through one interface), ``_sharding`` (DDP, DeepSpeed,
FSDP: the one place that decides what is sharded), ``_precompute`` and ``_cache`` (reference log-probs computed
once and cached on disk), ``_fingerprint`` (what identifies weights and data), ``_sync`` (TR-DPO updates).
"""

from ._manager import ReferenceManager, ReferenceMode
from ._sharding import sharding_of, shards_parameters
from ._sync import ReferenceSyncCallback

__all__ = ["ReferenceManager", "ReferenceMode", "ReferenceSyncCallback", "sharding_of", "shards_parameters"]
