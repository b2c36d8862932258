"""membank_cli: the `membank` command, the top floor of the house.

It drives training/ and services/ (and through them membank/), so it may import anything;
nothing imports it except the `python -m membank.cli` shim. Run it as `membank ...` or
`python -m membank_cli ...`.
"""
