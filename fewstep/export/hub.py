"""Publish an export on the Hugging Face Hub (``fewstep export RUN_DIR --out DIR --push-to-hub REPO_ID``).

``push_export(folder, repo_id, private, token)`` first verifies the folder against its manifest (every file's sha256,
no file added or missing: ``fewstep.export.files.verify_export``), then uploads it as it is with ``huggingface_hub``:
``create_repo(exist_ok=True)`` and one ``upload_folder`` commit holding exactly the export's files (those the manifest
lists, and the manifest; an ``eval/`` folder of ``fewstep eval`` reports is not part of the export). Files of an earlier
push that this export lacks are deleted in the same commit, so the repository never mixes two exports (git history
keeps them; ``.gitattributes`` stays).

An export is written for the place it is loaded from: its model card's snippet loads the student from the Hub id given
at export time (``export_run(..., hub_id=)``, recorded in the manifest), or from its folder. Pushing an export written
for another place is refused, since its card would point there.

A push that fails (offline, no network, no or a read-only token) raises ``PushError`` (the CLI's one-line error, exit
status 2) saying that the export is intact and how to push it later: ``fewstep export DIR --push-to-hub REPO_ID``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fewstep.export.files import verify_export
from fewstep.train.manifest import MANIFEST, IntegrityError

HUB_ID_KEY = "hub_id"  # manifest fingerprint field: the Hub repository an export was written for


class PushError(RuntimeError):
    """The upload to the Hub failed; the local export is untouched. The message says why and how to push later."""

    exit_status = 2  # fewstep.cli.main: a one-line error, no traceback


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a Hub model id of the form ``owner/name`` (the card loads the student from it).

    Raises:
        ValueError: naming the id and the form expected.
    """
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)  # HFValidationError (a ValueError) naming the rule
    if repo_id.count("/") != 1:
        raise ValueError(
            f"--push-to-hub {repo_id!r}: give the repository as owner/name (your user or organisation name, a slash, "
            "the model name), e.g. alice/sdxl-lcm-lora."
        )
    return repo_id


def hub_token(env_var: str | None) -> str | None:
    """The token in the environment variable ``env_var`` (``--hub-token-env``); ``None`` without one (then
    ``huggingface_hub`` uses ``HF_TOKEN`` or the token of ``hf auth login``). The token itself is never printed.

    Raises:
        ValueError: ``env_var`` is not set or empty.
    """
    if env_var is None:
        return None
    token = os.environ.get(env_var, "").strip()
    if not token:
        raise ValueError(
            f"--hub-token-env {env_var}: the environment variable {env_var} is not set or empty. Export a Hub token "
            f"with write access in it (export {env_var}=hf_...), or leave the option out to use `hf auth login`."
        )
    return token


def push_export(
    folder: str | Path, repo_id: str, private: bool = False, token: str | None = None, api: Any = None
) -> str:
    """Verify ``folder`` (an export) and upload it to the Hub model repository ``repo_id`` in one commit.

    Args:
        folder: the export directory (``fewstep export ... --push-to-hub repo_id`` or ``export_run(hub_id=)``).
        repo_id: ``owner/name``; created if missing (``private`` then applies; an existing repo keeps its visibility).
        private: create the repository private.
        token: a Hub token with write access (``None``: ``huggingface_hub``'s own: ``HF_TOKEN``, ``hf auth login``).
        api: an ``huggingface_hub.HfApi`` (default: ``HfApi(token=token)``).

    Returns:
        The URL of the repository.

    Raises:
        IntegrityError: a file of the export differs from its manifest, or it has none.
        ValueError: the export was written for another place than ``repo_id`` (its card would load from there).
        PushError: creating the repository or uploading failed (offline, network, permissions).
    """
    folder = Path(folder)
    check_repo_id(repo_id)
    manifest = verify_export(folder)
    if manifest is None:
        raise IntegrityError(
            f"{folder} has no {MANIFEST}, so its files cannot be verified before they are published. Export the run "
            f"again: fewstep export RUN_DIR --out {folder} --push-to-hub {repo_id}"
        )
    written_for = manifest["fingerprint"].get(HUB_ID_KEY)
    if written_for != repo_id:
        place = f"the Hub repository {written_for}" if written_for else f"its folder {folder}"
        raise ValueError(
            f"{folder} was exported for {place}: its model card loads the student from there. Export the run again "
            f"for this repository: fewstep export RUN_DIR --out {folder} --push-to-hub {repo_id}"
        )
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    files = [*sorted(manifest["files"]), MANIFEST]
    fingerprint = manifest["fingerprint"]
    message = (
        f"fewstep export: {fingerprint.get('objective')} {fingerprint.get('layout')} of {fingerprint.get('base_model')}"
    )
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type="model", allow_patterns=files, delete_patterns="*",
            commit_message=message,
        )  # fmt: skip
    except _hub_errors() as err:
        later = f"fewstep export {folder} --push-to-hub {repo_id}" + (" --private" if private else "")
        raise PushError(
            f"pushing to the Hub repository {repo_id} failed ({_reason(err)}). The export is intact at {folder}; "
            f"push it later with: {later}"
        ) from err
    return str(url)


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What ``huggingface_hub`` raises for offline mode, network and HTTP failures: ``OSError`` (offline mode, missing
    token, HTTP status errors) and its HTTP library's base error (connection refused, timeouts)."""
    from huggingface_hub.errors import HfHubHTTPError

    bases = [b for b in HfHubHTTPError.__mro__[1:] if b not in (Exception, BaseException, object)]
    return (OSError, *bases)


def _reason(err: BaseException) -> str:
    """The cause of a failed push in a few words, with the fix where there is one."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE=1 is set, so the Hub is not contacted"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, LocalTokenNotFoundError) or (isinstance(err, HfHubHTTPError) and status in (401, 403)):
        return (
            f"not authorised{f' (HTTP {status})' if status else ''}: log in with `hf auth login` or pass "
            "--hub-token-env VAR naming a variable that holds a token with write access"
        )
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    return f"{type(err).__name__}: {first}"
