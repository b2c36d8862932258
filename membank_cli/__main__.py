"""`python -m membank_cli ...`: the `membank` command (membank_cli/cli.py)."""
from membank_cli.cli import main

main()
