"""The stock Trainer's own features and optional tools, made to work with KTO (or refused with a reason).

``_hpo`` (``model_init`` and ``hyperparameter_search``), ``_eval_predictions`` (``compute_metrics`` and
``preprocess_logits_for_metrics``), ``_generation`` (``generate_during_eval``), ``_offload``
(``activation_offloading``), ``_router`` (the MoE router's auxiliary loss) and ``_liger`` (``use_liger_kernel``).
"""

from ._generation import KTOGenerationCallback
from ._offload import ActivationOffloader

__all__ = ["ActivationOffloader", "KTOGenerationCallback"]
