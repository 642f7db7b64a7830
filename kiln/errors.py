"""User-facing errors: one line that says what is wrong, shown without a traceback."""


class KilnError(Exception):
    """An error caused by input (a file, an option, a request), reported as one line."""


class EngineLoadError(KilnError):
    """An engine directory that cannot be loaded (missing file, bad hash, unknown format)."""


class BuildError(KilnError):
    """A source that cannot be built into an engine."""


class RequestError(KilnError):
    """A request that can never be served (too long, bad parameters). `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
