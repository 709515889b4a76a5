"""The KTO step: what runs for every micro-batch once a Trainer is attached.

``_compute_loss`` (`KTOComputeLoss`, the step itself, top to bottom), ``_logprobs`` (summed completion log-probs
without full-vocabulary logits, per token when asked), ``_passes`` (the no-grad KL and reference passes),
``_log_ratios`` (each row's log-ratio, one definition for rows and KL pairs), ``_reference_point`` (z0, every
estimator, the built-in reference-point plugins among them), ``_metrics`` (every logged name, the reward accuracy
and AUROC, the accumulator), ``_collectives`` (the ``reduce_sum`` and ``gather`` plugins get) and ``_nonfinite``
(`on_nonfinite`).

This package's ``__init__`` imports nothing, so that lower layers (the plugin manager, the built-in plugins) can
read the metric names and reference-point plugins without importing the step.
"""
