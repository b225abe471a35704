"""Test helper: the files a phantom generator wrote, as one dict to compare and read from."""

from __future__ import annotations

import os


def files_under(root: str) -> dict[str, bytes]:
    """Every file under ``root`` by "/"-separated relative path -> its bytes."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root).replace(os.sep, "/")] = f.read()
    return out
