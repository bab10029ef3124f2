"""User-facing errors: one line saying what was wrong, where, and what to do. The CLI prints them without a traceback."""


class ThinkfastError(Exception):
    """Bad input or an unusable file. `str(err)` is the whole message shown to the user."""


class ConfigError(ThinkfastError):
    pass


class CheckpointError(ThinkfastError):
    pass


class DataError(ThinkfastError):
    pass


# True while a `thinkfast` command runs: messages then name its flags; from Python they name the arguments.
_command_line = False


def option(flag: str, argument: str) -> str:
    """How a message names a setting: `--n 0` under the command, `n=0` from Python."""
    return flag if _command_line else argument


class command_line:
    """Context in which messages name command-line flags (see `option`)."""

    def __enter__(self):
        global _command_line
        self._before, _command_line = _command_line, True

    def __exit__(self, *exc):
        global _command_line
        _command_line = self._before
