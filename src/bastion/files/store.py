"""The blob store: a local directory. Every blob is written under a temporary name and renamed
when complete, so a crash never leaves a half file that looks whole."""

from __future__ import annotations

import os
import secrets
from pathlib import Path


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def tmp_dir(self) -> Path:
        """Same filesystem as the blobs, so the final rename is atomic."""
        path = self.root / ".partial"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def new_temp(self) -> Path:
        return self.tmp_dir / f"{secrets.token_hex(12)}.partial"

    def path(self, key: str) -> Path:
        return self.root / key

    def commit(self, temp: Path, key: str) -> Path:
        """Move a finished temporary file to its key."""
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, target)
        return target

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)
