"""The shared secret that signs UDP datagrams: read from a file, never
taken from the command line (which every user of the machine can read)."""

from __future__ import annotations

import os
import stat


def read_secret(path: str) -> bytes:
    """The secret in the file at *path*: its bytes, without surrounding
    whitespace.

    Raises ValueError when it is not a regular file, cannot be read, is
    empty, or can be read by every user of the machine.
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise ValueError(f"{path!r} is not a regular file")
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            secret = f.read().strip()
    except OSError as e:
        raise ValueError(f"cannot read {path!r}: {e.strerror or e}") from None
    if mode & stat.S_IROTH:
        raise ValueError(f"{path!r} is readable by everyone; chmod o-r it")
    if not secret:
        raise ValueError(f"{path!r} is empty")
    return secret
