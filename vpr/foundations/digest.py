"""Content hashes of files: what every artefact that is read back records about itself and is checked
against (descriptor-store sidecars, release manifests, the weights cache, the flows' cache keys)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (read in bounded chunks by ``hashlib.file_digest``)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def file_record(path: str | Path) -> dict:
    """``{"bytes", "sha256"}`` of a file, from one open (the size is the bytes that were hashed)."""
    with open(path, "rb") as fh:
        return {"bytes": os.fstat(fh.fileno()).st_size, "sha256": hashlib.file_digest(fh, "sha256").hexdigest()}
