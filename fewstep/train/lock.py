"""One run per output directory: a lock file, a refusal to start over on top of an earlier run, and a check that a
multi-process launch really is one.

* ``<output_dir>/.lock`` holds the PID, host and start time of the trainer using the directory. It is locked with
  ``fcntl.flock`` (POSIX), which the kernel releases when that process ends, however it ends: a second trainer is
  refused with the holder's PID and host, and a lock file left by a dead process is taken over with a warning.
  Without ``fcntl`` the file's PID is checked instead (alive on this host: refused). Only the main process locks.
* ``train.resume: never`` on a directory that holds checkpoints is refused (its pruning would delete the new run's
  checkpoints by step number, and ``resume: auto`` would later pick the old ones), unless ``train.overwrite`` /
  ``fewstep train --overwrite``, which renames the earlier run to ``<output_dir>.old-<time>``: nothing is deleted.
* ``WORLD_SIZE`` above 1 with an accelerator of one process means a launcher (``torchrun``) started several copies
  that accelerate did not join into one job: each would train alone into the same directory, so it is refused with
  the command that works.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOCK_FILE = ".lock"
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
ACCELERATE_CPU_LAUNCH = (
    "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N --num_machines 1 --mixed_precision no "
    "--dynamo_backend no -m fewstep train RECIPE"
)

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None  # type: ignore[assignment]


class RunDirError(ValueError):
    """The output directory cannot be used by this run (in use, holds an earlier run, a bad launch); the message
    names the directory and the fix."""

    exit_status = 2


class RunLock:
    """The lock of one run directory, held from ``acquire()`` to ``release()`` (or the end of the process).

    Args:
        run_dir: the run's ``output_dir`` (created if missing).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._file: Any = None
        self._created = False  # the directory was made for this lock: removed again if the run never wrote to it

    def acquire(self) -> RunLock:
        """Lock the directory or raise ``RunDirError`` naming the holder. Returns ``self``."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise RunDirError(
                f"output_dir {str(self.run_dir)!r} exists and is not a directory. Set another output_dir."
            )
        self._created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 (held open for as long as the lock)
        try:
            previous = _read_holder(self.path)
            if fcntl is not None:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise RunDirError(_in_use(self.run_dir, previous)) from None
            elif previous and previous.get("host") == socket.gethostname() and _alive(previous.get("pid")):
                raise RunDirError(_in_use(self.run_dir, previous))
            if previous and previous.get("pid") not in (None, os.getpid()):
                logger.warning(
                    "Took over the lock of %s left by PID %s on %s (started %s), which no longer holds it.",
                    self.run_dir,
                    previous.get("pid"),
                    previous.get("host"),
                    previous.get("started"),
                )
            handle.seek(0)
            handle.truncate()
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            handle.write(json.dumps(holder) + "\n")
            handle.flush()
        except BaseException:
            handle.close()
            raise
        self._file = handle
        return self

    def release(self) -> None:
        """Unlock (the file stays, empty: a later trainer rewrites it; a directory this lock created and nothing else
        wrote to goes away). Safe to call twice."""
        if self._file is None:
            return
        with contextlib.suppress(OSError):  # releasing must not mask the error that ended the run
            self._file.seek(0)
            self._file.truncate()
            mine = os.fstat(self._file.fileno()).st_ino == os.stat(self.path).st_ino  # not a moved-away file
            if self._created and mine and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
                self.path.unlink()
                self.run_dir.rmdir()
        if fcntl is not None:
            with contextlib.suppress(OSError):  # releasing must not mask the error that ended the run
                fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._file.close()
        self._file = None

    @property
    def held(self) -> bool:
        return self._file is not None


def claim_run_dir(run_dir: str | Path, resume: str, overwrite: bool) -> RunLock:
    """Lock ``run_dir`` for one trainer and make sure ``resume: never`` does not start on top of an earlier run.

    Args:
        run_dir: the recipe's ``output_dir``.
        resume: ``train.resume``.
        overwrite: ``train.overwrite``: move an earlier run aside rather than refuse.

    Returns:
        The held ``RunLock`` (release it when the run ends).

    Raises:
        RunDirError: the directory is locked by another trainer, or holds checkpoints and ``resume`` is ``never``
            without ``overwrite``.
    """
    run_dir = Path(run_dir)
    lock = RunLock(run_dir).acquire()
    try:
        earlier = earlier_checkpoints(run_dir) if resume == "never" else []
        if not earlier:
            return lock
        if not overwrite:
            raise RunDirError(
                f"output_dir {str(run_dir)!r} holds checkpoints of an earlier run (e.g. {earlier[-1].name}) and "
                "train.resume=never would train a new run on top of them (mixing its checkpoints with the old ones). "
                "Continue that run with train.resume=auto, pick another output_dir, or move the earlier run aside "
                "with `fewstep train --overwrite` (train.overwrite=true)."
            )
        aside = _aside_name(run_dir)
        os.replace(run_dir, aside)  # atomic: the earlier run stays whole, under its new name
        fresh = RunLock(run_dir).acquire()
        lock.release()
        (aside / LOCK_FILE).unlink(missing_ok=True)
        logger.warning("Moved the earlier run in %s aside to %s (train.overwrite).", run_dir, aside)
        return fresh
    except BaseException:
        lock.release()
        raise


def claim_on_main(run_dir: str | Path, resume: str, overwrite: bool, accelerator: Any) -> RunLock:
    """``claim_run_dir`` on the main process (collective): every rank raises if it failed there. Returns the held
    lock on the main process, an unheld one (``release`` does nothing) on the others."""
    lock, error = RunLock(run_dir), None
    if accelerator.is_main_process:
        try:
            lock = claim_run_dir(run_dir, resume, overwrite)
        except Exception as err:
            error = err
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([None if error is None else str(error)])[0]
        if error is None and message is not None:
            raise RunDirError(message)
    if error is not None:
        raise error
    return lock


def earlier_checkpoints(run_dir: str | Path) -> list[Path]:
    """The ``checkpoints/step_*`` directories (complete or not) and ``checkpoints/best`` of a run, by name."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step_") or p.name == "best")


def check_launch(accelerator: Any) -> None:
    """Refuse a launcher's copies that accelerate did not join: ``WORLD_SIZE`` (or MPI's size) above 1 while the
    accelerator runs a single process.

    Raises:
        RunDirError: with the launch command that works.
    """
    if accelerator.num_processes > 1:
        return
    for variable in _WORLD_SIZE_VARIABLES:
        value = os.environ.get(variable, "")
        if value.isdigit() and int(value) > 1:
            raise RunDirError(
                f"{variable}={value} says this is one of {value} processes, but accelerate set up a single process "
                "(no distributed backend), so each copy would train alone into the same output_dir. Launch with "
                f"accelerate: on CPUs `{ACCELERATE_CPU_LAUNCH}`; on GPUs `accelerate launch --num_processes N -m "
                "fewstep train RECIPE` (or `accelerate config` first). For one process, run `fewstep train` without "
                "torchrun / mpirun."
            )


def _read_holder(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _in_use(run_dir: Path, holder: dict[str, Any] | None) -> str:
    who = (
        f"PID {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')})"
        if holder
        else "another process"
    )
    return (
        f"output_dir {str(run_dir)!r} is in use by another trainer: {who}, holding {run_dir / LOCK_FILE}. Wait for it "
        "to finish or stop it, or set another output_dir."
    )


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except (OSError, OverflowError):
        return False
    return True


def _aside_name(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    k = 1
    while aside.exists():
        aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{k}")
        k += 1
    return aside
