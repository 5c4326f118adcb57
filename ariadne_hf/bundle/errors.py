"""The bundle errors: one hierarchy for every bundle problem, local or on the Hub.

    BundleError(ValueError)                    every bundle problem (corrupt, mismatched or unusable)
    ├── AdapterError                           an adapter folder cannot be used (not LoRA, DoRA, pickles, ...)
    └── BundleFilesError(BundleError, OSError) the files cannot be found, fetched or used
        ├── BundleNotFoundError                no such repo (or private/gated without a valid token)
        ├── BundleRevisionNotFoundError        no such branch, tag or commit
        ├── BundleNotCachedError               offline and not (completely) in the local cache
        ├── NotABundleError                    no config.json with model_type "ariadne"
        ├── UnsafeBundleError                  weights stored as pickles instead of safetensors
        └── IncompleteBundleError              files the config requires are missing

`BundleError` is a ValueError (what a corrupt or mismatched bundle always raised). `BundleFilesError` is also an
OSError: transformers' and huggingface_hub's loaders, and callers written for them, catch OSError for "not found /
not a model repo / not cached". The messages name the folder or repo, the file at fault and the fix.
"""

from __future__ import annotations


class BundleError(ValueError):
    """A bundle cannot be written, read or used: the message names the file or adapter at fault and the fix."""


class AdapterError(BundleError):
    """An adapter cannot be used: the message names the adapter, the problem and the fix."""


class BundleFilesError(BundleError, OSError):
    """The bundle's files cannot be found, fetched or used (a folder or a Hub repo); an OSError as well."""


"""The name this family had when only the Hub paths raised it (a bundle could not be pushed or pulled)."""


class BundleNotFoundError(BundleFilesError):
    """The repo does not exist, or is private/gated and no valid token was given."""


class BundleRevisionNotFoundError(BundleFilesError):
    """The repo exists but the requested branch, tag or commit does not."""


class BundleNotCachedError(BundleFilesError):
    """Offline (local_files_only or HF_HUB_OFFLINE) and the bundle is not complete in the local cache."""


class NotABundleError(BundleFilesError):
    """The folder or repo is not an ariadne bundle (no config.json with model_type "ariadne")."""


class UnsafeBundleError(BundleFilesError):
    """Weights are stored as pickles (.bin/.pt/...) instead of safetensors; they are never loaded or pushed."""


class IncompleteBundleError(BundleFilesError):
    """Files the bundle's config requires are missing (in the folder or repo, or after an interrupted download)."""
