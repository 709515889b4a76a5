"""kto_plugin's own warning category and exceptions, in one place (users filter and catch these by name)."""


class KTOPluginWarning(UserWarning):
    """A setting outside the KTO paper's guidance, or data that trains poorly (tests turn it into errors)."""


class NonFiniteLossError(FloatingPointError):
    """A non-finite KTO loss or z0 under ``KTOConfig(on_nonfinite="raise")``."""


class PluginError(RuntimeError):
    """A plugin raised, or returned something kto_plugin cannot use."""


class PluginValidationError(ValueError):
    """A plugin does not fit the hook specifications (misspelled hook, wrong arguments, wrapper)."""
