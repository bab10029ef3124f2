"""User-facing errors: one line saying what was wrong, where, and what to do. The CLI prints them without a traceback."""


class ThinkfastError(Exception):
    """Bad input or an unusable file. `str(err)` is the whole message shown to the user."""


class ConfigError(ThinkfastError):
    pass


class CheckpointError(ThinkfastError):
    pass


class DataError(ThinkfastError):
    pass
