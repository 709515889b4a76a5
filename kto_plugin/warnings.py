"""kto_plugin's own warning category (tests turn it into errors, so no warning goes unnoticed)."""


class KTOPluginWarning(UserWarning):
    """A setting outside the KTO paper's guidance, or data that trains poorly."""
