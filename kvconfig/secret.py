"""The shared secret that signs UDP datagrams: read from a file, never
taken from the command line (which every user of the machine can read)."""

from __future__ import annotations

import os
import stat


def read_secret(path: str) -> bytes:
    """The secret in *path*, without surrounding whitespace.

    Raises ValueError when the file cannot be read, is empty, or can be read
    by every user of the machine.
    """
    try:
        mode = os.stat(path).st_mode
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    if mode & stat.S_IROTH:
        raise ValueError(f"{path} is readable by every user; chmod o-r it")
    if not secret:
        raise ValueError(f"{path} is empty")
    return secret
