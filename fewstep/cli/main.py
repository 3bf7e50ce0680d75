"""``fewstep <verb> ...``: argparse with one module per verb (recipes, validate, train, export, eval, quickstart).

A user's mistake (a bad recipe, a missing file, a rejected value) prints ``error: ...`` and exits with status 2,
without a traceback; ``--debug`` adds the traceback. ``key=value`` overrides may come before or after options.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

from fewstep import __version__
from fewstep.cli import eval as eval_verb
from fewstep.cli import export, quickstart, recipes, train, validate
from fewstep.config.errors import RecipeError

VERBS = (recipes, validate, train, export, eval_verb, quickstart)
USER_ERROR_EXIT = 2


def build_parser() -> argparse.ArgumentParser:
    """The full parser; each verb module adds its subcommand and sets ``run`` as the handler."""
    parser = argparse.ArgumentParser(
        prog="fewstep",
        description="Distill multi-step diffusion and flow-matching models into 1-8 step students.",
        epilog="Run `fewstep <verb> --help` for a verb's options.",
    )
    parser.add_argument("--version", action="version", version=f"fewstep {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of errors")
    # The verbs accept --debug too; SUPPRESS keeps a subcommand's default from overwriting `fewstep --debug verb`.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb in VERBS:
        verb.add_parser(subparsers, [common])
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; stray ``key=value`` words after options join the verb's overrides."""
    args, extras = parser.parse_known_args(argv)
    unknown = [word for word in extras if word.startswith("-") or "=" not in word or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extras:
        args.overrides = [*args.overrides, *extras]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fewstep`` console script and of ``python -m fewstep``; returns the exit status."""
    parser = build_parser()
    args = parse_args(parser, argv)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return USER_ERROR_EXIT
    try:
        return int(args.run(args) or 0)
    except (RecipeError, FileNotFoundError, ValueError) as err:
        if args.debug:
            traceback.print_exc()
        print(f"error: {_message(err)}", file=sys.stderr)
        if not args.debug and not isinstance(err, RecipeError):
            print("(run again with --debug for the traceback)", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _message(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError) and err.filename is not None:
        return f"{err.strerror or 'file not found'}: {err.filename}"
    return str(err) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
