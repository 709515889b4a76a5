"""The plugin system: pluggy's manager for kto_plugin's hooks (specified in `kto_plugin.hookspecs`) and the
built-in losses, which are ordinary plugins registered last (``_manager``, ``_builtin``)."""

from ._manager import AUTOLOAD_ENV, KTOPluginManager

__all__ = ["AUTOLOAD_ENV", "KTOPluginManager"]
