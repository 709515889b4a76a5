"""kto_plugin's own warning category and exceptions, in one place (users filter and catch these by name)."""


class KTOPluginWarning(UserWarning):
    """A setting outside the KTO paper's guidance, or data that trains poorly (tests turn it into errors)."""


class NonFiniteLossError(FloatingPointError):
    """A non-finite KTO loss or z0 under ``KTOConfig(on_nonfinite="raise")``."""


class PluginError(RuntimeError):
    """A plugin raised, or returned something kto_plugin cannot use."""


class PluginValidationError(ValueError):
    """A plugin does not fit the hook specifications (misspelled hook, wrong arguments, wrapper)."""


class DataError(ValueError):
    """Bad preference data, raised by `KTOPlugin.prepare_dataset` before any training step.

    ``str(err)`` is `problem` (what is wrong and where: dataset, row, column) then `fix` (how, in Python);
    `file_fix` is the same fix for someone editing a data file (``kto-plugin train`` prints it), or None where
    the Python fix says it already.
    """

    def __init__(self, problem: str, fix: str = "", file_fix: str | None = None) -> None:
        super().__init__(problem, fix, file_fix)  # all three in args: the error pickles (datasets' num_proc)
        self.problem, self.fix, self.file_fix = problem, fix, file_fix

    def __str__(self) -> str:
        return f"{self.problem} {self.fix}".strip()

    def for_file(self) -> str:
        """The message with the fix phrased for a data file."""
        return f"{self.problem} {self.file_fix or self.fix}".strip()
