"""The command-line tools' help formatter (argparse only, so `--help` answers before any heavy import)."""

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except where the help text states the default itself (`(default: the
    checkpoint's ...)` for an option whose value None means "what the checkpoint says")."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def command(main):
    """The console-script form of a `main(argv)` that returns its result (metrics, a prediction) to Python callers:
    the installed command discards the result, since a console script exits with whatever its function returns."""

    def run(argv=None):
        main(argv)

    run.__doc__ = main.__doc__
    return run
