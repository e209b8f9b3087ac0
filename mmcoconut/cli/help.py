"""What every command shares, torch-free so `--help` and the checks before loading answer before any heavy import: the
parser (its help formatter, `--debug`, one-line errors) and `command`, which turns a user error into one line."""

import argparse
import os
import sys

from mmcoconut.constants import DTYPE_NAMES, QUANTIZATIONS
from mmcoconut.errors import UserError

DEBUG_ENV = "MMCOCONUT_DEBUG"
DEBUG_HELP = f"show the traceback of an expected error too (also: {DEBUG_ENV}=1)"


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except where the help text states the default itself (`(default: the
    checkpoint's ...)` for an option whose value None means "what the checkpoint says"), for a required option
    (its default is never used), for a default of None (the help says what leaving the option out does) and for an
    on/off flag (off unless given)."""

    def _get_help_string(self, action):
        flag = action.nargs == 0 and action.default is False
        if "(default:" in (action.help or "") or action.required or action.default is None or flag:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """A command's parser: the defaults formatter, `--debug`, and a bad flag reported in one line (exit status 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help=DEBUG_HELP)

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} ({self.prog} --help lists the options)\n")


def debugging(argv=None):
    """Whether to show the traceback of a user error: `--debug` among the arguments, or MMCOCONUT_DEBUG set."""
    args = sys.argv[1:] if argv is None else list(argv)
    return "--debug" in args or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def command(main):
    """The console-script form of a `main(argv)`: a `UserError` (`mmcoconut.errors`: a missing file, an unreachable
    Hub, a wrong flag value, ...) is printed as one line, `PROG: message`, on stderr, and the command exits with the
    error's status (2; 1 for a `SetupError`); with `--debug` or MMCOCONUT_DEBUG=1 it keeps its traceback. Every other
    exception keeps its traceback. `main` itself stays as it is for Python callers (tests catch its exceptions), and
    its result (metrics, a prediction) is discarded, since a console script exits with whatever its function returns."""

    def run(argv=None):
        try:
            main(argv)
        except UserError as error:
            if debugging(argv):
                raise
            print(f"{os.path.basename(sys.argv[0])}: {error}", file=sys.stderr)
            sys.exit(error.exit_status)

    run.__doc__ = main.__doc__
    return run


def latent_count(text):
    """`--num-latents`' type for the analysis commands: an integer, or `steps` (each record's step count)."""
    if text == "steps":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'steps', got {text!r}") from None


def add_loading_args(parser):
    """The options of the commands that load a trained checkpoint to answer with it (predict, app)."""
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="none",
                        help="load the weights quantized: torchao-int8 (CPU or GPU; needs the quantization extra) or "
                             "bitsandbytes 8/4-bit (CUDA only)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="auto",
                        help="dtype of the loaded weights (auto: the checkpoint's)")
    parser.add_argument("--device", default=None, help="cuda, cpu, cuda:1, ... (default: cuda when available, else cpu)")
    return parser

