"""Which software this is: the installed hemafed's version and a digest of its files.

The site report and the audit results name both, so a reader can tell whether two documents came from the
same code. The digest is SHA-256 over every file of the installed `hemafed` package (its Python modules and
shipped assets, not compiled caches), each as its path relative to the package and its contents, in sorted
order: the same installed files give the same digest on any machine.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import metadata
from pathlib import Path

SKIP_DIRS = {"__pycache__"}
SKIP_SUFFIXES = {".pyc", ".pyo"}


def version() -> str:
    try:
        return metadata.version("hemafed")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def package_roots() -> dict[str, Path]:
    """The installed package's top folders (hemafed.core, .network, .gui, .assets) by their import name."""
    import hemafed.core
    import hemafed.network

    roots = {"core": Path(hemafed.core.__file__).parent, "network": Path(hemafed.network.__file__).parent}
    for name in ("gui", "assets"):
        try:
            module = __import__(f"hemafed.{name}", fromlist=["__file__"])
        except ImportError:  # a headless install may lack the app; the digest then says so by being different
            continue
        if getattr(module, "__file__", None):
            roots[name] = Path(module.__file__).parent
    return roots


@functools.cache
def package_digest() -> str:
    """SHA-256 (hex) of the installed package's files; see the module docstring."""
    h = hashlib.sha256()
    for name, root in sorted(package_roots().items()):
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root)
            if not path.is_file() or SKIP_DIRS & set(rel.parts) or path.suffix in SKIP_SUFFIXES:
                continue
            data = path.read_bytes()
            h.update(f"{name}/{rel.as_posix()}\0{len(data)}\0".encode())
            h.update(data)
    return h.hexdigest()


def version_string() -> str:
    """"hemafed 0.1.0 (package sha256 1a2b…)": one line for a document's footer."""
    return f"hemafed {version()} (package sha256 {package_digest()[:16]}…)"
