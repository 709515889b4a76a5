"""The KTO step: what runs for every micro-batch once a Trainer is attached.

``_compute_loss`` (`KTOComputeLoss`, the step itself, top to bottom), ``_logprobs`` (summed completion log-probs
without full-vocabulary logits), ``_passes`` (the no-grad KL and reference passes), ``_reference_point`` (z0,
every estimator), ``_metrics`` (every logged name and the accumulator) and ``_nonfinite`` (`on_nonfinite`).

This package's ``__init__`` imports nothing, so that lower layers (the plugin manager) can read the metric names
without importing the step.
"""
