"""The errors a user can fix (a wrong flag, a missing file, an unreachable Hub, a missing extra): standard library only.

Every command catches `UserError` in one place (`mmcoconut.cli.help.command`) and prints its message as one line,
`PROG: message`, on stderr, with no traceback, exiting with the error's `exit_status`; `--debug` (or
MMCOCONUT_DEBUG=1) shows the traceback as well. Any other exception is a bug and keeps its traceback. Each subclass is
also the built-in type the error would otherwise be (`UserFileNotFoundError` is a `FileNotFoundError`), so callers
that catch the built-in types keep working. docs/errors.md lists the cases.
"""

import reprlib


class UserError(Exception):
    """An expected error whose message says what to change: a command prints it as one line and exits with 2 (as
    argparse does for a bad flag)."""

    exit_status = 2


class SetupError(UserError, RuntimeError):
    """This machine cannot run the command as it stands (no network for a Hub id, no GPU for bf16)."""


class UserValueError(UserError, ValueError):
    """A value the user gave is wrong (`--choices` in one string, an invalid recipe)."""


class UserFileNotFoundError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist, or a checkpoint directory lacks files."""


class UserNotADirectoryError(UserError, NotADirectoryError):
    """A path the user gave as a directory is a file."""


class UserFileExistsError(UserError, FileExistsError):
    """The command would replace an earlier run's results (pass --overwrite, or another output directory)."""


class MissingExtraError(UserError, ModuleNotFoundError):
    """An optional dependency (a pip extra) the chosen option needs is not installed."""


def shorten(value, limit=80, quote=True):
    """`repr(value)` (a string as it is without `quote`) cut to about `limit` characters, saying how long it was, for
    messages that quote a value the user gave: a 100,000-character question or an alias bomb's list must not become
    a message of that size (nor take that long to write: containers go through `reprlib`, which stops early)."""
    if isinstance(value, str):
        text = repr(value) if quote else value
        return text if len(text) <= limit else f"{text[:limit]}... ({len(value):,} characters)"
    bounded = reprlib.Repr()  # (its keyword arguments are Python 3.12's)
    bounded.maxlevel, bounded.maxstring, bounded.maxother = 2, limit, limit
    bounded.maxlist = bounded.maxtuple = bounded.maxdict = bounded.maxset = 6
    text = bounded.repr(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    if "..." in text and isinstance(value, (list, tuple, dict, set)):
        text += f" ({len(value):,} items)"
    return text


__all__ = [
    "shorten", "UserError", "SetupError", "UserValueError", "UserFileNotFoundError", "UserNotADirectoryError",
    "UserFileExistsError", "MissingExtraError",
]
