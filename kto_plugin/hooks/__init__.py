"""The plugin system: pluggy's manager for kto_plugin's hooks (specified in `kto_plugin.hookspecs`), calling them
and checking what they return, and the built-in KTO family, ordinary plugins registered last (``_manager``,
``_calls``, ``_builtin``)."""

from ._manager import AUTOLOAD_ENV, KTOPluginManager

__all__ = ["AUTOLOAD_ENV", "KTOPluginManager"]
