"""Secrets given as files (token files for gRPC auth), shared by the bank server and the device."""
from __future__ import annotations

import argparse
from pathlib import Path


def read_secret(path: str) -> str:
    """A token file's content, surrounding whitespace removed (an argparse `type` for
    *-token-file)."""
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {e.strerror}") from None
    if not token:
        raise argparse.ArgumentTypeError(f"{path} is empty")
    return token
