"""``fewstep <verb> ...``: argparse with one module per verb (recipes, validate, data, train, export, eval, sample,
quickstart, pairs, compare, plan, cache).

A user's mistake (a bad recipe, a missing or unwritable path, a corrupt or foreign checkpoint, export or data file)
prints one ``error: ...`` line naming the cause and the fix and exits with status 2, without a traceback; a run that
started and failed (the trainer's stop after non-finite steps, a full disk) exits with status 1. ``--debug`` adds the
traceback. Anything else is a bug in fewstep and keeps its traceback. ``key=value`` overrides may come before or after
options. ``--allow-code`` lets a recipe import the Python code it names (``objective.reward: custom:<module>:<fn>``).

Start-up stays light: only the verb being run has its module imported (``fewstep --help`` imports none, so no torch);
the others appear in the verb list by the one-line help kept in ``VERBS``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import sys
import traceback
from collections.abc import Collection, Sequence
from pathlib import Path

from fewstep import __version__

# verb -> (module with add_parser(subparsers, parents) and run(args), its one-line help in the verb list)
VERBS: dict[str, tuple[str, str]] = {
    "recipes": ("fewstep.cli.recipes", "list the shipped recipes"),
    "validate": ("fewstep.cli.validate", "check a recipe and report every error at once"),
    "train": ("fewstep.cli.train", "distill a student from a recipe"),
    "export": ("fewstep.cli.export", "export a trained student for diffusers"),
    "eval": ("fewstep.cli.eval", "measure FID / accuracy, NFE, latency and memory of a student or teacher"),
    "sample": ("fewstep.cli.sample", "write images of a student, an export or a teacher for prompts / labels"),
    "quickstart": ("fewstep.cli.quickstart", "distill the digits teacher on a CPU and print the quality table"),
    "pairs": ("fewstep.cli.pairs", "write a reflow recipe's teacher pairs"),
    "compare": ("fewstep.cli.compare", "compare two runs: curves, final values, eval reports, recipe differences"),
    "data": ("fewstep.cli.data", "write a recipe's starter data (prompts, or images drawn from its teacher)"),
    "plan": ("fewstep.cli.plan", "predict a recipe's GPU memory per rank and the cheapest layout that fits"),
    "cache": ("fewstep.cli.cache", "precompute text embeddings and VAE latents, to train without the encoders"),
}
USER_ERROR_EXIT = 2  # bad input: recipe, paths, corrupt or foreign files
RUN_FAILED_EXIT = 1  # a run that started and failed: non-finite stop, disk full
ALLOW_CODE_ENV = "FEWSTEP_ALLOW_CODE"  # fewstep.objectives.consistency.pcm reads the same variable
MAX_MESSAGE_CHARS = 4000
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


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
    parser.add_argument(
        "--allow-code",
        action="store_true",
        help="let recipes import the Python code they name (custom: rewards); only for trusted recipes",
    )
    # The verbs accept --debug too; SUPPRESS keeps a subcommand's default from overwriting `fewstep --debug verb`.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")
    common.add_argument(
        "--allow-code", action="store_true", default=argparse.SUPPRESS,
        help="let the recipe import and run the Python module it names (objective.reward: custom:<module>:<fn>); "
        "only for recipes you trust",
    )  # fmt: skip
    subparsers = parser.add_subparsers(dest="verb", metavar="VERB")
    for verb, (module, help_text) in VERBS.items():
        if load is None or verb in load:
            importlib.import_module(module).add_parser(subparsers, [common])
        else:
            subparsers.add_parser(verb, help=help_text)
    return parser


def print_once(*values: object, **kwargs: object) -> None:
    """``print`` on the main process only: once per job under ``accelerate launch``, where every rank runs the verb
    (``accelerate.PartialState``: the state a run has set up already, or a new one set up as ``Accelerator`` would,
    CPU processes included)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    if PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).is_main_process:
        print(*values, **kwargs)


def what_is(path: Path) -> str:
    """What stands at ``path`` where a directory was expected: "is a file, not a directory", "does not exist", ..."""
    if path.is_file():
        return "is a file, not a directory"
    return "is not a directory" if path.exists() else "does not exist"


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
    consent = os.environ.get(ALLOW_CODE_ENV)
    if args.allow_code:
        os.environ[ALLOW_CODE_ENV] = "1"  # an environment variable: ranks started by `accelerate launch` inherit it
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        status = exit_status(err)
        if status is None:
            raise  # not a known user or run error: a bug, with its traceback
        if args.debug:
            traceback.print_exc()
        print(f"error: {_which_process()}{error_message(err)}", file=sys.stderr)
        if not args.debug and not _is(err, "fewstep.config.errors", "RecipeError"):
            print("(run again with --debug for the traceback)", file=sys.stderr)
        return status
    finally:
        if consent is None:
            os.environ.pop(ALLOW_CODE_ENV, None)
        else:
            os.environ[ALLOW_CODE_ENV] = consent


def _which_process() -> str:
    """``[process R of N] `` under a multi-process launch (torchrun / accelerate set RANK and WORLD_SIZE), so the
    launcher's output says which rank failed; nothing otherwise."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f"[process {os.environ.get('RANK', '?')} of {world}] " if world.isdigit() and int(world) > 1 else ""


def _is(err: BaseException, module: str, name: str) -> bool:
    """``isinstance(err, module.name)`` without importing ``module``: an error of that class means it is loaded."""
    cls = getattr(sys.modules.get(module), name, None)
    return isinstance(cls, type) and isinstance(err, cls)


def _raised_by_trainer(err: BaseException) -> bool:
    """Whether ``err`` was raised inside ``fewstep/train`` (the trainer's own stop, not a bug elsewhere)."""
    tb, last = err.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and Path(last.tb_frame.f_code.co_filename).parent.as_posix().endswith("fewstep/train")


def exit_status(err: BaseException) -> int | None:
    """The exit status for an error ``fewstep`` reports in one line: 2 for bad input, 1 for a run that failed;
    ``None`` for anything else (a bug: its traceback is printed).

    An exception class may set ``exit_status`` (an int) itself; ``fewstep.config.errors.RunFailedError`` sets 1.
    """
    status = getattr(err, "exit_status", None)
    if isinstance(status, int):
        return status
    if _disk_full_errno(err) is not None:
        return RUN_FAILED_EXIT
    input_errors = (
        ("fewstep.config.errors", "RecipeError"),
        ("fewstep.train.checkpoint", "CheckpointError"),
        ("fewstep.train.manifest", "IntegrityError"),
        ("safetensors", "SafetensorError"),
        ("pickle", "UnpicklingError"),
    )
    if any(_is(err, module, name) for module, name in input_errors):
        return USER_ERROR_EXIT
    if isinstance(err, ValueError | OSError | KeyError | TypeError | RecursionError):
        return USER_ERROR_EXIT
    if _is(err, "torch", "OutOfMemoryError") or isinstance(err, MemoryError):
        return RUN_FAILED_EXIT
    if isinstance(err, RuntimeError) and _raised_by_trainer(err):
        return RUN_FAILED_EXIT  # e.g. the stop after too many non-finite steps
    return None


def _disk_full_errno(err: BaseException) -> int | None:
    """ENOSPC / EDQUOT / EFBIG from an ``OSError``, or from safetensors' writer (``... (os error 28)``)."""
    if isinstance(err, OSError):
        return err.errno if err.errno in _DISK_FULL else None
    if _is(err, "safetensors", "SafetensorError"):
        found = re.search(r"\(os error (\d+)\)", str(err))
        if found and int(found.group(1)) in _DISK_FULL:
            return int(found.group(1))
    return None


def error_message(err: BaseException) -> str:
    """What went wrong and the fix, for the ``error:`` line (long messages are cut)."""
    text = _message(err)
    return text if len(text) <= MAX_MESSAGE_CHARS else text[: MAX_MESSAGE_CHARS - 3] + "..."


_OS_FIXES = {
    errno.ENOSPC: "no space left on the device: free some space (or point output_dir / --out at another disk) and "
    "run again; a training run continues from its last checkpoint (train.resume: auto)",
    errno.EDQUOT: "disk quota exceeded: free some space or point output_dir / --out elsewhere, then run again",
    errno.EFBIG: "file too large for this file system or process limit (ulimit -f): raise the limit or write elsewhere",
    errno.EACCES: "permission denied: choose a location you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a location you can write to, or fix its permissions",
    errno.EROFS: "read-only file system: point output_dir / --out at a writable location",
    errno.EEXIST: "a file is in the way where a directory is needed: point output_dir / --out elsewhere, or move "
    "the file",
    errno.ENOTDIR: "a path component is a file, not a directory: point output_dir / --out / the path at a directory",
    errno.EISDIR: "is a directory, but a file is needed here: give the file's path",
    errno.ENOENT: "no such file or directory: check the path",
}


def _message(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno in _OS_FIXES and err.filename is not None:
        return f"{err.filename}: {_OS_FIXES[err.errno]}"
    full = _disk_full_errno(err)
    if full is not None:
        return f"{_OS_FIXES[full]} ({err})"
    if isinstance(err, FileNotFoundError) and err.filename is not None:
        return f"{err.strerror or 'file not found'}: {err.filename}"
    if isinstance(err, RecursionError):
        return (
            "a file or value is nested too deeply to read (RecursionError): it is corrupt or not a fewstep file; "
            "--debug shows where it was read"
        )
    if isinstance(err, KeyError | TypeError):
        from fewstep.config.errors import short_repr

        detail = short_repr(err.args[0], 200) if isinstance(err, KeyError) and err.args else str(err)
        return (
            f"{type(err).__name__}: {detail}: a file fewstep read lacks this entry or holds a value of another type "
            "(a corrupt or foreign file); --debug shows which. If every file is intact, this is a bug in fewstep: "
            "please report it with the --debug output"
        )
    text = str(err)
    if not text:
        return type(err).__name__
    return text


if __name__ == "__main__":
    sys.exit(main())
