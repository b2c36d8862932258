"""membank: language models with hierarchical parametric memories.

This package is the code that training, the bank server and the model client share: model
configs, the router, the block format, the manifest, storage keys and placement, all torch-free
(the bank server imports them without torch); the anchor model, its memories and everything
else that needs torch live in `membank.nn`. It never imports from `services/` or `training/`;
only the CLI (`membank_cli/`; `membank/cli.py` is its `python -m` shim) sits above everything.
"""
