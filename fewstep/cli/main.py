"""``fewstep <verb> ...``: argparse with one module per verb (recipes, validate, train, export, eval, quickstart,
pairs).

A user's mistake (a bad recipe, a missing file, a rejected value) prints ``error: ...`` and exits with status 2,
without a traceback; ``--debug`` adds the traceback. ``key=value`` overrides may come before or after options.

Start-up stays light: only the verb being run has its module imported (``fewstep --help`` imports none, so no torch);
the others appear in the verb list by the one-line help kept in ``VERBS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Collection, Sequence

from fewstep import __version__

# verb -> (module with add_parser(subparsers, parents) and run(args), its one-line help in the verb list)
VERBS: dict[str, tuple[str, str]] = {
    "recipes": ("fewstep.cli.recipes", "list the shipped recipes"),
    "validate": ("fewstep.cli.validate", "check a recipe and report every error at once"),
    "train": ("fewstep.cli.train", "distill a student from a recipe"),
    "export": ("fewstep.cli.export", "export a trained student for diffusers"),
    "eval": ("fewstep.cli.eval", "measure FID / accuracy, NFE, latency and memory of a student or teacher"),
    "quickstart": ("fewstep.cli.quickstart", "distill the digits teacher on a CPU and print the quality table"),
    "pairs": ("fewstep.cli.pairs", "write a reflow recipe's teacher pairs"),
}
USER_ERROR_EXIT = 2


def build_parser(load: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The ``fewstep`` parser. Each verb in ``load`` (default: every verb) is built by its own module, which sets
    ``run`` as the handler; the other verbs are listed by name and help only, and their modules are not imported."""
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
    for verb, (module, help_text) in VERBS.items():
        if load is None or verb in load:
            importlib.import_module(module).add_parser(subparsers, [common])
        else:
            subparsers.add_parser(verb, help=help_text)
    return parser


def requested_verb(argv: Sequence[str]) -> str | None:
    """The verb ``argv`` asks for: its first word that is not an option (the top-level options take no value)."""
    word = next((w for w in argv if not w.startswith("-")), None)
    return word if word in VERBS else None


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
    argv = list(sys.argv[1:] if argv is None else argv)
    verb = requested_verb(argv)
    parser = build_parser(load=[verb] if verb else [])
    args = parse_args(parser, argv)
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return USER_ERROR_EXIT
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        from fewstep.config.errors import RecipeError  # lazy: only an error needs it

        if not isinstance(err, RecipeError | FileNotFoundError | ValueError):
            raise
        if args.debug:
            traceback.print_exc()
        print(f"error: {_message(err)}", file=sys.stderr)
        if not args.debug and not isinstance(err, RecipeError):
            print("(run again with --debug for the traceback)", file=sys.stderr)
        return USER_ERROR_EXIT


def _message(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError) and err.filename is not None:
        return f"{err.strerror or 'file not found'}: {err.filename}"
    return str(err) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
