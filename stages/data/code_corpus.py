"""A real code corpus that is on every machine: the Python standard library's own source files.

`data.source: python_stdlib` reads the top-level `*.py` modules of the running interpreter's
standard library (`sysconfig.get_paths()["stdlib"]`), sorted by name, and cuts each into its
top-level definitions (functions and classes, found with `ast`): one document per definition. It
needs no network and no download, it is real code written by people (PSF licence), and it is the
language HumanEval asks for. `prepare_data` packs the documents into rows of whole blocks and holds
out a fraction of them; a held-out definition's opening (signature, docstring, first lines) is a
code-completion prompt, as a HumanEval problem is (docs/data.md). The corpus depends on the
interpreter's version, which `describe()` records.
"""
from __future__ import annotations

import ast
import sys
import sysconfig
from pathlib import Path
from typing import Any

SOURCE = "python_stdlib"


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def definitions(source: str) -> list[str]:
    """The source text of each top-level function and class of a module (decorators included)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            out.append("".join(lines[start: node.end_lineno]))
    return out


def stdlib_rows(max_documents: int, text_column: str = "text", min_chars: int = 200) -> list[dict[str, Any]]:
    """Up to `max_documents` rows `{text_column: definition, "path": file name}`, one per top-level
    definition of at least `min_chars` characters (files that are not UTF-8 are skipped), in a
    fixed order."""
    root = stdlib_dir()
    files = sorted(root.glob("*.py"))
    if not files:
        raise ValueError(f"data.source={SOURCE}: no *.py files in the standard library directory {root}")
    rows = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for definition in definitions(text):
            if len(definition) >= min_chars:
                rows.append({text_column: definition, "path": f.name})
            if len(rows) >= max_documents:
                return rows
    return rows


def describe() -> dict[str, Any]:
    """Where the corpus came from, for the data manifest."""
    return {"source": SOURCE, "python": sys.version.split()[0], "dir": stdlib_dir().name}
