"""membank: language models with hierarchical parametric memories.

This package is the code that training, the bank server and the model client share: model
configs, the anchor model and its FFN memories, the router, the block format, the manifest,
storage keys and placement. It never imports from `services/` or `training/`; only the CLI
(`membank.cli`) sits above everything.
"""
