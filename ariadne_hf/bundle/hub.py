"""Whole bundles to and from the Hugging Face Hub: push in one commit, pull exactly the bundle's files.

Push: the bundle is written to a temporary folder (the model's `save_pretrained`), checked, and uploaded with one
`HfApi.create_commit` holding every file (config, router, adapters/<name>/*, tokenizer, generation config, card,
images, optional base/), plus deletions of stale bundle files (a removed adapter's folder). One commit means a
repo never holds half a bundle. (`HfApi.upload_folder` is not used: with `hf_xet` installed, huggingface_hub 2.x
streams large folders in several commits; `PreTrainedModel.push_to_hub` uploads one folder level only and
overwrites README.md.)

Pull: `snapshot_download` of the bundle files only (never pickles, never unrelated files of the repo), pinned to
the commit the revision pointed to when the pull started, into the ordinary HF cache (HF_HOME), so
`local_files_only=True` / HF_HUB_OFFLINE=1 work afterwards. The result is checked before it is returned: a folder
that is not a complete ariadne bundle raises, it is never handed to the model loader.

What a bundle holds and the checks of its files are in `layout` (the same validator the local loader runs); the
errors are in `errors`.
"""

from __future__ import annotations

import contextlib
import glob
import inspect
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..constants import (
    BASE_DIR,
    CONFIG_NAME,
    MODEL_CARD_NAME,
    REPO_ID_PLACEHOLDER,
)
from .errors import (
    BundleNotCachedError,
    BundleNotFoundError,
    BundleRevisionNotFoundError,
    IncompleteBundleError,
)
from .layout import (
    FIX_PUSH_AGAIN,
    check_bundle_files,
    check_bundle_folder,
    is_bundle_file,
    is_owned_by_bundle,
    list_local_files,
    read_bundle_config,
)

__all__ = ["check_local_bundle", "pull_bundle", "push_bundle", "push_bundle_dir", "resolve_bundle"]

logger = logging.getLogger(__name__)


def check_local_bundle(directory: str | os.PathLike) -> dict[str, Any]:
    """Validate a local bundle folder for pushing (`layout.check_bundle_folder`, refusing any pickle in it);
    returns its config dict.

    Raises NotABundleError, UnsafeBundleError (any pickle anywhere in the folder) or IncompleteBundleError.
    """
    config, _ = check_bundle_folder(directory, f"Bundle folder {os.fspath(directory)!r}", refuse_any_pickle=True)
    return config


# ---- push -----------------------------------------------------------------------------------------------------
def push_bundle(save_bundle: Callable[[str], None], repo_id: str, **options):
    """Write the bundle with `save_bundle(directory)` into an empty temporary folder and push it in one commit.

    `options` are the keyword arguments of `push_bundle_dir` (revision, private, token, commit_message, create_pr,
    replace_readme, endpoint), checked before anything is written (TypeError naming an unknown one). See
    `push_bundle_dir` for the guarantees. Returns the `huggingface_hub.CommitInfo` of the commit.
    """
    inspect.signature(push_bundle_dir).bind(os.curdir, repo_id, **options)  # a wrong keyword fails before any work
    with tempfile.TemporaryDirectory(prefix="ariadne-push-") as directory:
        save_bundle(directory)
        return push_bundle_dir(directory, repo_id, **options)


def push_bundle_dir(
    directory: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    replace_readme: bool = False,
    endpoint: str | None = None,
):
    """Push an existing local bundle folder to `repo_id` in one commit; returns its `CommitInfo`.

    Guarantees: the folder is validated first (an ariadne bundle, complete, no pickles) and nothing is sent if it
    is not; the repo is created if needed (`private` applies then) and the branch `revision` too; every non-hidden
    file of the folder is uploaded in ONE commit, which also deletes the repo's stale bundle files (adapters/ and
    base/ files and known root bundle files the folder no longer has), so the repo's bundle equals the folder's.
    A README.md already in the repo is kept (with the images it links) unless `replace_readme=True`. The card's
    repo-id placeholder is replaced by `repo_id`. With `create_pr=True` the commit goes to a new pull request.
    An unchanged bundle makes no commit (the CommitInfo then names the current head).
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):
        raise ValueError(f"push: revision={revision!r} is a commit sha; pass a branch name (or None for 'main').")
    config = check_local_bundle(directory)
    files = list_local_files(directory)
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(repo_id, revision):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision not in (None, "main") and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        remote = set(api.list_repo_files(repo_id, revision=revision))
    keep_readme = MODEL_CARD_NAME in remote and not replace_readme
    if keep_readme and MODEL_CARD_NAME in files:
        logger.warning("%s: keeping the README.md already in the repo; pass replace_readme=True to replace it with "
                       "the bundle's generated card.", repo_id)
    operations: list[Any] = []
    for path in files:
        if path == MODEL_CARD_NAME and keep_readme:
            continue
        local = os.path.join(directory, *path.split("/"))
        if path == MODEL_CARD_NAME:
            card = Path(local).read_text(encoding="utf-8").replace(REPO_ID_PLACEHOLDER, repo_id)
            operations.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=card.encode("utf-8")))
        else:
            operations.append(CommitOperationAdd(path_in_repo=path, path_or_fileobj=local))
    stale = sorted(path for path in remote - set(files) if is_owned_by_bundle(path, replacing_card=not keep_readme))
    operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
    names = config.get("adapter_names") or []
    message = commit_message or f"Upload ariadne bundle ({len(names)} adapters: {', '.join(names)})"
    with _hub_errors(repo_id, revision):
        return api.create_commit(repo_id, operations, commit_message=message, revision=revision,
                                 create_pr=create_pr)


# ---- pull -----------------------------------------------------------------------------------------------------
def resolve_bundle(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    endpoint: str | None = None,
    include_card: bool = False,
) -> str:
    """A local folder holding the bundle `name_or_path` (a local directory, returned as is, or a Hub repo id).

    For a repo id: downloads the bundle files only (config, router, tokenizer and generation config, the adapters
    the config lists, base/ when the backbone is stored there, and README.md + images/ if `include_card`) at the
    commit `revision` (default: main) points to, into the HF cache. Offline (`local_files_only` or HF_HUB_OFFLINE)
    it uses the cache only. Guarantees: the returned folder is an ariadne bundle with every file its config
    requires, all weights safetensors; otherwise a `BundleFilesError` subclass names the
    repo/revision/file and the fix (repo missing, revision missing, not a bundle, pickled weights, incomplete, not
    cached).
    """
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        return name
    _check_repo_id(name)
    from huggingface_hub import constants

    common = {"cache_dir": cache_dir, "token": token, "endpoint": endpoint}
    with _hub_errors(name, revision):
        if local_files_only or constants.is_offline_mode():
            return _cached_bundle(name, revision, common)
        return _download_bundle(name, revision, common, force_download=force_download, include_card=include_card)


def _download_bundle(repo_id: str, revision: str | None, common: dict, *, force_download: bool,
                     include_card: bool) -> str:
    import httpx2
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    # 1. config.json at the revision: resolves the revision to a commit (and records it in the cache's refs/).
    folder = snapshot_download(repo_id, revision=revision, allow_patterns=[CONFIG_NAME],
                               force_download=force_download, **common)
    commit = Path(folder).name
    where = f"Hub repo {repo_id!r} (revision {revision or 'main'}, commit {commit[:10]})"
    try:
        remote = HfApi(endpoint=common["endpoint"], token=common["token"]).list_repo_files(repo_id, revision=commit)
    except (httpx2.ConnectError, httpx2.TimeoutException, OfflineModeIsEnabled):
        logger.warning("%s: the Hub is unreachable; using the cached bundle.", repo_id)
        return _checked_cached_folder(folder, where + " (cached)")
    # 2. the repo must hold a complete safetensors bundle before anything else is downloaded.
    config = read_bundle_config(folder, where, remote)
    check_bundle_files(remote, config, where, fix=FIX_PUSH_AGAIN)
    wanted = sorted(
        path for path in remote
        if is_bundle_file(path, adapter_names=config.get("adapter_names") or [], include_card=include_card,
                          include_base=config.get("backbone_name_or_path") == BASE_DIR)
    )
    # 3. exactly those files, at the same commit (a branch moving meanwhile cannot mix two bundles).
    try:
        folder = snapshot_download(repo_id, revision=commit, allow_patterns=[glob.escape(p) for p in wanted],
                                   force_download=force_download, **common)
    except (HfHubHTTPError, httpx2.HTTPError) as err:
        raise IncompleteBundleError(
            f"{where}: the download failed part-way ({type(err).__name__}: {err}). Nothing was loaded; retry."
        ) from err
    _check_complete(folder, wanted, where)
    return folder


def _cached_bundle(repo_id: str, revision: str | None, common: dict) -> str:
    from huggingface_hub import snapshot_download

    folder = snapshot_download(repo_id, revision=revision, allow_patterns=[CONFIG_NAME], local_files_only=True,
                               **common)
    return _checked_cached_folder(folder, f"Cached bundle {repo_id!r} (revision {revision or 'main'})")


def _checked_cached_folder(folder: str, where: str) -> str:
    """Return the cached snapshot `folder` if it holds a complete bundle, else raise BundleNotCachedError."""
    try:
        check_bundle_folder(folder, where, fix="")
    except IncompleteBundleError as err:
        raise BundleNotCachedError(
            f"{err} The bundle is not completely in the local cache: load it once with network access (without "
            "local_files_only=True / HF_HUB_OFFLINE=1)."
        ) from err
    return folder


def _check_complete(folder: str, wanted: list[str], where: str) -> None:
    """Raise IncompleteBundleError if a file of `wanted` is missing from the downloaded folder."""
    missing = [p for p in wanted if not os.path.isfile(os.path.join(folder, *p.split("/")))]
    if missing:
        raise IncompleteBundleError(
            f"{where}: the download is incomplete, missing {', '.join(missing[:5])}. Retry (force_download=True "
            "re-fetches every file)."
        )


def pull_bundle(
    repo_id: str,
    *,
    revision: str | None = None,
    local_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    endpoint: str | None = None,
) -> str:
    """Download the whole bundle (including README.md and images/) and return its folder (for `ariadne pull`).

    Without `local_dir` the folder is in the HF cache. With `local_dir` (which must not exist or be empty) the
    files are copied there, through a temporary sibling folder renamed at the end, so `local_dir` never holds a
    partial bundle. Errors as in `resolve_bundle`.
    """
    folder = resolve_bundle(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                            local_files_only=local_files_only, force_download=force_download, endpoint=endpoint,
                            include_card=True)
    if local_dir is None:
        return folder
    target = Path(local_dir).resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{target} exists and is not an empty folder; pass a new or empty local_dir.")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for path in list_local_files(folder):
            destination = staging.joinpath(*path.split("/"))
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(os.path.join(folder, *path.split("/")), destination)  # follows cache symlinks
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return str(target)


# ---- error translation ----------------------------------------------------------------------------------------
def _check_repo_id(name: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as err:
        raise BundleNotFoundError(
            f"{name!r} is neither a local folder nor a valid Hub repo id ('namespace/name'): {err}"
        ) from err


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Translate huggingface_hub errors into BundleFilesError subclasses with the fix in the message."""
    from huggingface_hub.errors import (
        GatedRepoError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError as err:
        raise BundleNotFoundError(
            f"Bundle repo {repo_id!r} is gated: accept its conditions on the Hub and pass token=... ({err})"
        ) from err
    except RepositoryNotFoundError as err:
        raise BundleNotFoundError(
            f"Bundle repo {repo_id!r} was not found on the Hub (and no local folder has that name). Check the repo "
            "id ('namespace/name'); if the repo is private, pass token=... (or log in with `hf auth login`) with "
            "access to it."
        ) from err
    except RevisionNotFoundError as err:
        raise BundleRevisionNotFoundError(
            f"Revision {revision!r} does not exist in bundle repo {repo_id!r}. Pass an existing branch, tag or "
            "commit sha (or no revision for 'main')."
        ) from err
    except IncompleteSnapshotError as err:
        raise BundleNotCachedError(
            f"Bundle {repo_id!r} (revision {revision or 'main'}) is only partly in the local cache: {err}"
        ) from err
    except LocalEntryNotFoundError as err:
        raise BundleNotCachedError(
            f"Bundle {repo_id!r} (revision {revision or 'main'}) is not in the local cache and the Hub cannot be "
            f"used (offline mode, local_files_only=True or no connection). Load it once online. ({err})"
        ) from err
