"""kto_plugin: KTO preference training for the stock Hugging Face Trainer, with no Trainer subclass.

The package, by concept: `config` (KTOConfig) and `hookspecs` (the plugin contract) at the top, `loss` (the
losses as pure functions), `plugin` (`KTOPlugin`, the public entry point), then `data/` (formats, tokenisation,
truncation, the collator, vision rows), `reference/` (the reference model in every form, precompute and its
cache, TR-DPO sync), `step/` (the compute-loss hook: one KTO step, log-probs, z0, metrics), `hooks/` (the plugin
manager and the built-in losses), `trainer/` (attach/detach through one ledger, validation, resume, callbacks),
`integrations/` (hyperparameter search, eval predictions, generation, offloading, MoE router, Liger), `cli/`
(the `kto-plugin` command) and `demo/` (the embedded tiny default).
"""

from ._logging import install_default_handler
from ._version import __version__
from .config import KTOConfig
from .data import KTOCollator, KTOLabels
from .errors import DataError, KTOPluginWarning, NonFiniteLossError, PluginError, PluginValidationError
from .hooks import KTOPluginManager
from .hookspecs import hookimpl, hookspec
from .plugin import KTOPlugin

install_default_handler()  # the summaries of prepare_dataset and attach() on screen by default

__all__ = [
    "DataError",
    "KTOCollator",
    "KTOConfig",
    "KTOLabels",
    "KTOPlugin",
    "KTOPluginManager",
    "KTOPluginWarning",
    "NonFiniteLossError",
    "PluginError",
    "PluginValidationError",
    "__version__",
    "hookimpl",
    "hookspec",
]
