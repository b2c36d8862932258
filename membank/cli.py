"""`python -m membank.cli ...`: the `membank` command at the address scripts and torchrun use.

The CLI lives in membank_cli/ (it drives training and services, so it sits above them); this
shim is the one place membank/ names it.
"""
from membank_cli.cli import main

if __name__ == "__main__":
    main()
