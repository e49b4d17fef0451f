"""What every ``moekernels reproduce <method>`` shares: the recipe (TOML) loader and the generated block of a
``models/<method>/RESULTS.md`` (text between ``<!-- BEGIN GENERATED: ... -->`` and ``<!-- END GENERATED -->``,
rewritten by the command; everything outside it is hand-written and kept)."""
from __future__ import annotations

from pathlib import Path

__all__ = ["END", "begin_marker", "write_generated", "load_recipe"]

END = "<!-- END GENERATED -->"


def begin_marker(name: str) -> str:
    return f"<!-- BEGIN GENERATED: {name} -->"


def write_generated(path: Path, text: str, begin: str) -> None:
    """Replace the block of ``path`` that starts with ``begin`` (up to the next END marker) with ``text``;
    append the block when the file has none."""
    path = Path(path)
    doc = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text}{END}"
    a = doc.find(begin)
    b = doc.find(END, a) if a >= 0 else -1
    if a >= 0 and b >= 0:
        doc = doc[:a] + block + doc[b + len(END):]
    else:
        doc = doc + ("\n" if doc else "") + block + "\n"
    path.write_text(doc)


def load_recipe(path: Path | None) -> dict:
    """The TOML recipe as a dict ({} when ``path`` is None or missing)."""
    if path is None or not Path(path).exists():
        return {}
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        try:
            import tomli as tomllib
        except ImportError as e:
            raise ImportError(f"reading the recipe {path} needs Python >= 3.11 or `pip install tomli`") from e

    with open(path, "rb") as f:
        return tomllib.load(f)
