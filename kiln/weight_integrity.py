"""Are an engine's weight files what its manifest says? sha256 of whole files and of 1 GiB parts
(hashed at build by `WeightHasher`, checked at load on parallel threads), and the record of files
already verified, so that an unchanged engine is not hashed again on every load."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import EngineLoadError

if TYPE_CHECKING:
    from kiln.engine_dir import EngineManifest

_HASH_CHUNK = 8 << 20


def sha256_file(path: str | os.PathLike, start: int = 0, length: int | None = None) -> str:
    """sha256 of the file, or of `length` bytes from `start`."""
    h = hashlib.sha256()
    left = length
    with open(path, "rb") as f:
        f.seek(start)
        while left is None or left > 0:
            chunk = f.read(_HASH_CHUNK if left is None else min(_HASH_CHUNK, left))
            if not chunk:
                break
            h.update(chunk)
            if left is not None:
                left -= len(chunk)
    return h.hexdigest()


PART_BYTES = 1 << 30  # weight files are also hashed in parts of this size, checked in parallel


class WeightHasher:
    """sha256 of a whole file being written, and of each PART_BYTES part of it (the manifest's
    `sha256_parts`): a load checks the parts on several cores at once (hashlib releases the GIL),
    13.5 GB in a few seconds instead of one core's 13."""

    def __init__(self, part_bytes: int = PART_BYTES):
        self.part_bytes = part_bytes
        self.whole = hashlib.sha256()
        self._part = hashlib.sha256()
        self._in_part = 0
        self.parts: list[str] = []

    def update(self, data) -> None:
        mv = memoryview(data).cast("B")
        self.whole.update(mv)
        while len(mv):
            take = min(len(mv), self.part_bytes - self._in_part)
            self._part.update(mv[:take])
            self._in_part += take
            mv = mv[take:]
            if self._in_part == self.part_bytes:
                self.parts.append(self._part.hexdigest())
                self._part, self._in_part = hashlib.sha256(), 0

    def manifest_entry(self, file: str, size: int) -> dict[str, Any]:
        parts = self.parts + ([self._part.hexdigest()] if self._in_part else [])
        return {"file": file, "sha256": self.whole.hexdigest(), "bytes": size,
                "sha256_parts": {"part_bytes": self.part_bytes, "digests": parts}}


def _check_parts(path: Path, w: dict[str, Any], size: int) -> str | None:
    """Hash the file's parts in parallel; the first mismatch as an error message, or None."""
    from concurrent.futures import ThreadPoolExecutor

    spec = w["sha256_parts"]
    part, digests = int(spec["part_bytes"]), list(spec["digests"])
    if part <= 0 or len(digests) != max(1, -(-size // part)):
        return f"{w['file']}: the manifest's sha256 parts do not cover {size} bytes; rebuild the engine"
    workers = max(1, min(len(digests), os.cpu_count() or 1, 16))
    with ThreadPoolExecutor(workers) as pool:
        got = list(pool.map(lambda i: sha256_file(path, i * part, part), range(len(digests))))
    for i, (want, have) in enumerate(zip(digests, got)):
        if want != have:
            return (f"{w['file']}: sha256 mismatch in part {i} (bytes {i * part}..; expected "
                    f"{want[:12]}…, got {have[:12]}…); the engine is corrupt, rebuild it")
    return None


VERIFIED_CACHE = "verified-weights.json"  # in the kiln cache directory
# Only files unmodified for this long are remembered as verified: a rewrite within the same
# timestamp tick as the verification would otherwise keep the same mtime.
_SETTLED_NS = 2_000_000_000


def _file_key(path: Path, st: os.stat_result, sha256: str) -> str:
    """What identifies one verified file: where it is, its inode, size and modification time, and
    the hash it was checked against. Rewriting the file changes its mtime (or inode), which
    invalidates the entry."""
    return f"{path.resolve()}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{sha256}"


def _verified_cache_path() -> Path:
    from kiln.build.default_model import cache_dir

    return cache_dir() / VERIFIED_CACHE


def _read_verified() -> set[str]:
    try:
        data = json.loads(_verified_cache_path().read_text(encoding="utf-8"))
        return set(data) if isinstance(data, list) else set()
    except (OSError, ValueError):
        return set()


def _record_verified(keys: list[str]) -> None:
    path = _verified_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        known = sorted(_read_verified() | set(keys))[-256:]  # bounded
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(known), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the next load a re-hash


def verify_weights(manifest: EngineManifest, use_cache: bool = True) -> None:
    """Hash every weight file and compare with the manifest; refuse a mismatch.

    A file with `sha256_parts` is checked part by part on several threads (WeightHasher). With
    `use_cache`, a file verified before and unchanged since (same inode, size and mtime) is not
    hashed again. The record lives in the kiln
    cache directory (`$KILN_CACHE_DIR/verified-weights.json`), never in the engine directory."""
    known = _read_verified() if use_cache else set()
    verified = []
    for w in manifest.weights:
        path = manifest.path / w["file"]
        if not path.is_file():
            raise EngineLoadError(f"engine weight file missing: {path}; rebuild the engine")
        st = path.stat()
        size = st.st_size
        if "bytes" in w and size != int(w["bytes"]):
            raise EngineLoadError(
                f"{w['file']}: size mismatch (expected {w['bytes']} bytes, got {size}); "
                "the engine is corrupt, rebuild it"
            )
        if "sha256" in w:
            key = _file_key(path, st, w["sha256"])
            if key in known:
                continue
            if "sha256_parts" in w:
                err = _check_parts(path, w, size)
                if err:
                    raise EngineLoadError(err)
            else:  # engines built before the parts were recorded
                got = sha256_file(path)
                if got != w["sha256"]:
                    raise EngineLoadError(
                        f"{w['file']}: sha256 mismatch (expected {w['sha256'][:12]}…, got {got[:12]}…); "
                        "the engine is corrupt, rebuild it"
                    )
            if time.time_ns() - st.st_mtime_ns > _SETTLED_NS:
                verified.append(key)  # a file modified moments ago could change again unseen
    if use_cache and verified:
        _record_verified(verified)
