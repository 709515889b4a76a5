"""kto_plugin: KTO preference training for the stock Hugging Face Trainer, with no Trainer subclass."""

from ._version import __version__
from .collator import KTOCollator, KTOLabels
from .config import KTOConfig
from .hookspecs import hookimpl, hookspec
from .nonfinite import NonFiniteLossError
from .plugin import KTOPlugin
from .plugin_manager import KTOPluginManager, PluginError, PluginValidationError
from .warnings import KTOPluginWarning

__all__ = [
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
