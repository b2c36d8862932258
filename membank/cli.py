"""`python -m membank.cli`: the old address of the command line, kept for scripts and torchrun.

The CLI lives in membank_cli/ (it drives training and services, so it sits above them); this
shim is the one place membank/ names it.
"""
from membank_cli.cli import main

if __name__ == "__main__":
    main()
