"""The bundle: one folder (or Hub repo) holding config, router tensors, tokenizer, adapters and a model card.

- `layout`     which files a bundle holds and requires, the pickle rules, the one file validator (folder or file list)
- `errors`     the bundle errors: BundleError (a ValueError) and its OSError family (not found, not a bundle, ...)
- `local_io`   write/read a local bundle, integrity (sha256), router, version and backbone checks, load into a model
- `adapters`   PEFT adapter folders: resolve (local/Hub), validate, summary
- `hub`        push (one commit) / pull (snapshot_download, pinned, validated)
- `model_card` README.md rendered from `hub_cards/` plus the routing pictures

Import from the submodules; this package imports nothing so that any of them loads on its own.
"""
