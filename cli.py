"""The command line's edge, torch-free (so --help answers at once): one-line user errors, exit code 2."""

import argparse
import os
import sys


class UserError(Exception):
    """A mistake the user can fix (bad path, bad flag value, bad data): shown as one line, no traceback."""


def run_cli(main, argv=None):
    """Run a script's main(); a UserError becomes `error: ...` on stderr (rank 0 only under torchrun), exit 2."""
    try:
        return main(argv)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":  # every rank meets the same mistake: say it once
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


class CLIParser(argparse.ArgumentParser):
    """argparse whose mistakes are UserErrors: one line and exit 2 under run_cli, not a usage dump."""

    def error(self, message):
        raise UserError(message)


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help names every default but a switch's; a flag whose default is None says in its own help what decides it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def bounded(kind, low, inclusive=True, below=None):
    """An argparse type: `kind` (int or float) at least `low` (above it when not inclusive), under `below` if given."""
    def convert(text):
        value = kind(text)
        if not (value >= low if inclusive else value > low) or not (below is None or value < below):  # NaN fails
            upper = "" if below is None else f" and < {below}"
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low}{upper}, got {text}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return convert


def help_requested():
    """True when the command line asks for --help: scripts answer it before importing torch (~2 s)."""
    return any(a in ("-h", "--help") for a in sys.argv[1:])
