"""Repository-level training documents, as in DeepSeek-Coder §2.2 (Algorithm 1).

A repository's files are ordered so that each file comes after the files it imports, then concatenated, each
file preceded by a one-line comment holding its path::

    # pkg/util.py
    def helper(): ...

    # pkg/main.py
    from pkg.util import helper

The header is the comment marker, a space and the path, as in DeepSeek-Coder's released repository-level
completion example (``#utils.py`` ... ``# model.py``); C-like languages use ``//``, SQL/Lua/Haskell ``--``.

Steps: :func:`read_repository` (a directory) or :func:`read_repositories_jsonl` (one repository per line) ->
:func:`import_graph` (intra-repository imports; Python parsed with :mod:`ast`, regular expressions for files
that do not parse and for C/C++ ``#include``, JS/TS ``import``/``require`` and Java ``import``) ->
:func:`order_files` (Algorithm 1: connected subgraphs, then a topological sort that always takes a remaining
file of minimum in-degree, so cycles cannot stall it; ties go to the smallest path, where the paper picks at
random) -> :func:`repository_documents`: as in the paper, each connected subgraph becomes one training document
(``unit="repository"`` concatenates the subgraphs instead). :func:`load_repository_corpus` does all of it for a
training run (``data.corpus: "repo:<path>"``).

Bad input never stops a run halfway: files that are not source code, not UTF-8, binary, too large, unreadable
or symlinks are left out and counted (``Repository.skipped``, one log line per corpus); a missing path, a
malformed JSONL line or a corpus without any source file is a ``ValueError`` before training starts.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import heapq
import json
import logging
import os
import posixpath
import re
from collections.abc import Iterable, Mapping

log = logging.getLogger(__name__)

REPO_PREFIX = "repo:"  # data.corpus prefix selecting repository-level documents
MAX_FILE_BYTES = 1 << 20
UNITS = ("subgraph", "repository")

# Line-comment marker of each source extension (also the set of files read; anything else is skipped).
_COMMENT = {
    **dict.fromkeys((".py", ".pyi", ".sh", ".bash", ".rb", ".pl", ".r", ".jl"), "#"),
    **dict.fromkeys((".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".hxx", ".cu", ".cuh"), "//"),
    **dict.fromkeys((".js", ".jsx", ".mjs", ".cjs", ".ts", ".tsx"), "//"),
    **dict.fromkeys((".java", ".cs", ".go", ".rs", ".kt", ".scala", ".swift", ".php", ".dart"), "//"),
    **dict.fromkeys((".sql", ".lua", ".hs"), "--"),
}
_C_EXTS = (".c", ".h", ".cc", ".cpp", ".cxx", ".hpp", ".hh", ".hxx", ".cu", ".cuh")
_JS_EXTS = (".ts", ".tsx", ".js", ".jsx", ".mjs", ".cjs")
_SKIP_DIRS = frozenset({"__pycache__", "node_modules", "venv"})  # caches and vendored installs (plus dot-dirs)


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One file: ``path`` relative to the repository root, ``/``-separated and normalised."""

    path: str
    content: str


@dataclasses.dataclass(frozen=True)
class Repository:
    """A repository's source files (sorted by path) and the ``(path, reason)`` of every file left out."""

    name: str
    files: tuple[SourceFile, ...]
    skipped: tuple[tuple[str, str], ...] = ()


def comment_marker(path: str) -> str:
    """The line-comment marker used for ``path``'s header (``#``, ``//`` or ``--``)."""
    return _COMMENT[_ext(path)]


def _ext(path: str) -> str:
    return posixpath.splitext(path)[1].lower()


def make_repository(name: str, files: Iterable[tuple[str, str | bytes]], *, max_file_bytes=MAX_FILE_BYTES):
    """A :class:`Repository` from ``(path, content)`` pairs, keeping the usable source files.

    ``bytes`` content must be UTF-8. Left out, with the reason in ``skipped``: unknown extensions, paths that
    leave the repository or repeat, more than ``max_file_bytes`` bytes, invalid UTF-8, NUL bytes (binary).
    """
    kept, skipped = {}, []
    for raw_path, content in files:
        path = posixpath.normpath(str(raw_path).replace("\\", "/"))
        reason = None
        if path.startswith(("/", "../")) or path in (".", "..") or "\n" in path or "\r" in path:
            reason = "invalid path"
        elif _ext(path) not in _COMMENT:
            reason = "not a source file"
        elif path in kept:
            reason = "duplicate path"
        elif len(content) > max_file_bytes:  # bytes, or characters: a cheap bound before decoding
            reason = "too large"
        elif isinstance(content, bytes):
            try:
                content = content.decode("utf-8")
            except UnicodeDecodeError:
                reason = "not UTF-8"
        if reason is None and len(content.encode("utf-8")) > max_file_bytes:
            reason = "too large"
        if reason is None and "\x00" in content:
            reason = "binary (NUL byte)"
        if reason is None:
            kept[path] = SourceFile(path, content)
        else:
            skipped.append((str(raw_path), reason))
    return Repository(name, tuple(kept[p] for p in sorted(kept)), tuple(skipped))


def read_repository(root: str | os.PathLike, *, name: str | None = None, max_file_bytes=MAX_FILE_BYTES) -> Repository:
    """The source files under directory ``root`` (dot-directories, ``__pycache__``, ``node_modules`` and
    ``venv`` are not entered; symlinks and unreadable files are skipped and recorded).

    Raises:
      ValueError: ``root`` is not a directory.
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise ValueError(f"{root}: not a directory" if os.path.exists(root) else f"{root} does not exist")
    pairs, skipped = [], []
    for here, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in _SKIP_DIRS)
        for n in sorted(names):
            full = os.path.join(here, n)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if _ext(rel) not in _COMMENT:
                skipped.append((rel, "not a source file"))
            elif os.path.islink(full):
                skipped.append((rel, "symlink"))  # may point outside the repository
            else:
                try:
                    if os.path.getsize(full) > max_file_bytes:
                        skipped.append((rel, "too large"))  # not read at all
                        continue
                    with open(full, "rb") as f:
                        pairs.append((rel, f.read()))
                except OSError as e:
                    skipped.append((rel, f"unreadable ({e.strerror or e})"))
    repo = make_repository(name or os.path.basename(os.path.abspath(root)), pairs, max_file_bytes=max_file_bytes)
    return dataclasses.replace(repo, skipped=tuple(skipped) + repo.skipped)


def read_repositories_jsonl(path: str | os.PathLike, *, max_file_bytes=MAX_FILE_BYTES) -> list[Repository]:
    """Repositories from a JSONL file, one per line: ``{"repo": name, "files": [{"path": ..., "content": ...}]}``.

    Raises:
      ValueError: a line that is not such an object (the message gives the line number).
    """
    repos = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                where = f"{os.fspath(path)}:{lineno}"
                repos.append(make_repository(*_parse_repository_line(line, where), max_file_bytes=max_file_bytes))
    return repos


def _parse_repository_line(line: str, where: str) -> tuple[str, list[tuple[str, str]]]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
    if not (isinstance(obj, dict) and isinstance(obj.get("repo"), str) and isinstance(obj.get("files"), list)):
        raise ValueError(f'{where}: expected {{"repo": str, "files": [{{"path": str, "content": str}}, ...]}}')
    pairs = []
    for i, entry in enumerate(obj["files"]):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("path", "content")):
            raise ValueError(f"{where}: files[{i}] needs a string 'path' and a string 'content'")
        pairs.append((entry["path"], entry["content"]))
    return obj["repo"], pairs


# --- imports -------------------------------------------------------------------------------------------------


class _Index:
    """Path lookups shared by the import resolvers of one repository."""

    def __init__(self, paths: Iterable[str]):
        self.paths = frozenset(paths)
        self.by_name = collections.defaultdict(list)  # basename -> paths, for suffix matches
        for p in sorted(self.paths):
            self.by_name[posixpath.basename(p)].append(p)
        dirs = {posixpath.dirname(p) for p in self.paths}
        dirs |= {d.rsplit("/", i)[0] for d in dirs if d for i in range(d.count("/") + 1)} | {""}
        packages = {d for d in dirs if d and {_init_of(d), _init_of(d) + "i"} & self.paths}
        # Python search roots: directories that are neither a package nor inside one (the repository root, a
        # src/ layout, a scripts/ folder run directly), as if each were on sys.path; shallowest first.
        root_key = lambda d: (d.count("/") + bool(d), d)
        roots = frozenset(d for d in dirs if not _in_package(d, packages))
        # Top-level module or directory name -> the roots that hold it, so an import only visits those roots.
        roots_with = collections.defaultdict(set)
        for p in self.paths:
            child, parent = p, posixpath.dirname(p)
            while True:
                if parent in roots:
                    name = posixpath.basename(child)
                    roots_with[name if child != p else posixpath.splitext(name)[0]].add(parent)
                if not parent:
                    break
                child, parent = parent, posixpath.dirname(parent)
        self.roots_with = {name: sorted(found, key=root_key) for name, found in roots_with.items()}

    def module_file(self, parts: tuple[str, ...]) -> str | None:
        """The file of Python module ``parts`` (a module file or a package's ``__init__``), if in the repository."""
        base = "/".join(parts)
        stems = [base + ".py", base + ".pyi"] if parts else []
        for cand in (*stems, _init_of(base), _init_of(base) + "i"):
            if cand in self.paths:
                return cand
        return None

    def suffix_match(self, rel: str) -> str | None:
        """The shallowest file whose path is ``rel`` or ends with ``/rel`` (ties: smallest path)."""
        hits = [p for p in self.by_name.get(posixpath.basename(rel), ()) if p == rel or p.endswith("/" + rel)]
        return min(hits, key=lambda p: (p.count("/"), p)) if hits else None


def _init_of(d: str) -> str:
    return f"{d}/__init__.py" if d else "__init__.py"


def _in_package(d: str, packages: set[str]) -> bool:
    """Whether directory ``d`` or one of its ancestors is a package."""
    while d:
        if d in packages:
            return True
        d = posixpath.dirname(d)
    return False


_PY_IMPORT = re.compile(r"^[ \t]*import[ \t]+([\w. \t,]+)", re.M)
_PY_FROM = re.compile(r"^[ \t]*from[ \t]+(\.*)[ \t]*([\w.]*)[ \t]+import[ \t]+\(?([\w \t,*]*)", re.M)


def _python_refs(content: str) -> list[tuple[int, str, tuple[str, ...]]]:
    """``(level, module, names)`` of every import statement (``import a.b`` is ``(0, "a.b", ())``)."""
    try:
        tree = ast.parse(content)
    except (SyntaxError, ValueError, RecursionError):
        # Python 2 files, templates, syntax errors: line-based patterns still find most imports.
        names = lambda s: tuple(w.split()[0] for w in s.split(",") if w.split())
        refs = [(0, m, ()) for g in _PY_IMPORT.findall(content) for m in names(g)]
        return refs + [(len(dots), mod, names(ns)) for dots, mod, ns in _PY_FROM.findall(content)]
    refs = []
    for node in _statements(tree.body):  # also imports inside functions, try/except and if TYPE_CHECKING blocks
        if isinstance(node, ast.Import):
            refs += [(0, a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            refs.append((node.level, node.module or "", tuple(a.name for a in node.names)))
    return refs


def _statements(body: list[ast.stmt]):
    """Every statement, nested ones included. Imports are statements, so expressions need no visit (5x faster
    than :func:`ast.walk` on typical code)."""
    stack = list(body)
    while stack:
        node = stack.pop()
        yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):  # every field that holds statements
            stack.extend(getattr(node, field, ()))


def _python_module(index: _Index, root: tuple[str, ...], parts: tuple[str, ...], names: tuple[str, ...]) -> set[str]:
    """Files that ``from <root>.<parts> import <names>`` (``import <root>.<parts>`` if no names) refers to."""
    # Names may be submodules (edges to them) or attributes (an edge to the module itself).
    submodules = {f for n in names if n != "*" and (f := index.module_file((*root, *parts, n)))}
    if names and "*" not in names and len(submodules) == len(names):
        return submodules
    # A dotted module only partly in the repository resolves to its longest prefix that is (e.g. its package);
    # with no parts (``from . import x``) the module is the package itself.
    for k in range(len(parts), 0, -1) if parts else (0,):
        if f := index.module_file((*root, *parts[:k])):
            return submodules | {f}
    return submodules


def _python_imports(path: str, content: str, index: _Index) -> set[str]:
    here = tuple(posixpath.dirname(path).split("/")) if "/" in path else ()
    out = set()
    for level, module, names in _python_refs(content):
        parts = tuple(p for p in module.split(".") if p)
        if level:  # relative: from the file's package, one directory up per extra dot
            if level - 1 > len(here):
                continue  # climbs out of the repository
            out |= _python_module(index, here[: len(here) - level + 1], parts, names)
        elif parts:
            # Absolute: the file's own directory first if it is a root (a script's directory is sys.path[0]),
            # then every root, shallowest first; the first root that has the module wins, as on sys.path.
            here_dir, candidates = "/".join(here), index.roots_with.get(parts[0], [])
            for r in ([here_dir] if here_dir in candidates else []) + candidates:
                if hit := _python_module(index, tuple(r.split("/")) if r else (), parts, names):
                    out |= hit
                    break
    return out


_C_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*([<"])([^>"\n]+)[>"]', re.M)
_JS_SPEC = re.compile(r"""(?:\bfrom|\bimport|\brequire)[ \t]*\(?[ \t]*['"](\.{1,2}/[^'"\n]*)['"]""")
_JAVA_IMPORT = re.compile(r"^[ \t]*import[ \t]+(?:static[ \t]+)?([\w.]+)[ \t]*;", re.M)


def _c_imports(path: str, content: str, index: _Index) -> set[str]:
    here, out = posixpath.dirname(path), set()
    for quote, inc in _C_INCLUDE.findall(content):
        # "x.h": next to the including file first; then (both forms) from the root, then any include directory.
        cands = ([posixpath.normpath(posixpath.join(here, inc))] if quote == '"' else []) + [posixpath.normpath(inc)]
        hit = next((c for c in cands if c in index.paths), None) or index.suffix_match(posixpath.normpath(inc))
        if hit:
            out.add(hit)
    return out


def _js_imports(path: str, content: str, index: _Index) -> set[str]:
    here, out = posixpath.dirname(path), set()
    for spec in _JS_SPEC.findall(content):  # relative specifiers only: bare ones name installed packages
        base = posixpath.normpath(posixpath.join(here, spec))
        stem, ext = posixpath.splitext(base)
        cands = [base, *(base + e for e in _JS_EXTS), *(f"{base}/index{e}" for e in _JS_EXTS)]
        if ext in (".js", ".jsx", ".mjs", ".cjs"):  # TypeScript imports its own files by their compiled names
            cands += [stem + ".ts", stem + ".tsx"]
        hit = next((c for c in cands if c in index.paths), None)
        if hit:
            out.add(hit)
    return out


def _java_imports(path: str, content: str, index: _Index) -> set[str]:
    out = set()
    for name in _JAVA_IMPORT.findall(content):
        parts = name.split(".")
        # a.b.C -> .../a/b/C.java; a static import or a nested class names a member: drop one level and retry.
        for k in (len(parts), len(parts) - 1):
            if k > 0 and (hit := index.suffix_match("/".join(parts[:k]) + ".java")):
                out.add(hit)
                break
    return out


_RESOLVERS = {
    **dict.fromkeys((".py", ".pyi"), _python_imports),
    **dict.fromkeys(_C_EXTS, _c_imports),
    **dict.fromkeys(_JS_EXTS, _js_imports),
    ".java": _java_imports,
}


def import_graph(repo: Repository) -> dict[str, set[str]]:
    """Each file's path -> the paths of the repository files it imports (never itself).

    Python: ``import a.b``, ``from a import b`` (``b`` a submodule or a name in ``a``), relative imports, each
    resolved to a module file or package ``__init__``; absolute imports are searched in the directories outside
    any package (the root, ``src/``, script folders). C/C++: ``#include`` (next to the file, from the root, then
    by path suffix). JS/TS: relative ``import``/``export ... from``/``require``/``import()``. Java: single-type
    and static imports (not ``.*``). Other languages have no edges.
    """
    index = _Index(f.path for f in repo.files)
    graph = {}
    for f in repo.files:
        resolver = _RESOLVERS.get(_ext(f.path))
        graph[f.path] = (resolver(f.path, f.content, index) if resolver else set()) - {f.path}
    return graph


# --- ordering and documents ----------------------------------------------------------------------------------


def order_files(deps: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """DeepSeek-Coder's Algorithm 1: file orders, one per connected subgraph of the import graph.

    ``deps[a]`` holds the files ``a`` imports (edges b -> a; the in-degree of ``a`` is its number of imports).
    Within each weakly connected subgraph the sort repeatedly takes the remaining file of minimum in-degree
    (ties: the smallest path) and removes its out-edges. On an acyclic graph the minimum is always 0, so every
    file follows everything it imports; in a cycle it still takes the file with the fewest unmet imports.
    Subgraphs are returned in the order of their smallest path.

    Raises:
      ValueError: an edge to a file that is not a key of ``deps``.
    """
    nodes = sorted(deps)
    users = {n: set() for n in nodes}  # b -> files importing b
    indegree = dict.fromkeys(nodes, 0)
    for a in nodes:
        for b in set(deps[a]) - {a}:
            if b not in users:
                raise ValueError(f"{a} imports {b}, which is not in the graph")
            users[b].add(a)
            indegree[a] += 1
    neighbours = {n: users[n] | (set(deps[n]) - {n}) for n in nodes}
    seen, orders = set(), []
    for start in nodes:  # sorted: components come out in the order of their smallest path
        if start in seen:
            continue
        component, stack = [], [start]
        seen.add(start)
        while stack:
            n = stack.pop()
            component.append(n)
            new = neighbours[n] - seen
            seen |= new
            stack.extend(new)
        orders.append(_min_indegree_sort(component, users, indegree))
    return orders


def _min_indegree_sort(component: list[str], users: Mapping[str, set[str]], indegree: dict[str, int]) -> list[str]:
    # A heap with lazy deletion: every in-degree change pushes a fresh entry; stale ones (larger degree) are
    # skipped when popped. O(E log V) instead of the paper's O(V^2) scan, same result.
    heap = [(indegree[n], n) for n in component]
    heapq.heapify(heap)
    done, order = set(), []
    while len(order) < len(component):
        degree, n = heapq.heappop(heap)
        if n in done or degree != indegree[n]:
            continue
        done.add(n)
        order.append(n)
        for m in users[n] - done:
            indegree[m] -= 1
            heapq.heappush(heap, (indegree[m], m))
    return order


def file_block(f: SourceFile) -> str:
    """``f`` with its path header: ``"{marker} {path}\\n{content}"``, ending in a newline."""
    body = f.content if not f.content or f.content.endswith("\n") else f.content + "\n"
    return f"{comment_marker(f.path)} {f.path}\n{body}"


def repository_documents(repo: Repository, *, unit: str = "subgraph") -> list[str]:
    """Training documents of ``repo``: the files of each connected subgraph (``unit="subgraph"``, the paper's
    choice) or of the whole repository (``unit="repository"``) in :func:`order_files` order, as
    :func:`file_block` s separated by a blank line."""
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
    by_path = {f.path: f for f in repo.files}
    groups = order_files(import_graph(repo))
    if unit == "repository":
        groups = [[p for g in groups for p in g]] if groups else []
    return ["\n".join(file_block(by_path[p]) for p in g) for g in groups]


def load_repository_corpus(source: str | os.PathLike, *, unit: str = "subgraph") -> list[str]:
    """Documents of a directory (one repository) or a ``.jsonl`` file of repositories, for the data pipeline.

    Skipped files are counted by reason in one log line; repositories without a usable file are dropped.

    Raises:
      ValueError: ``source`` is missing or of another kind, a JSONL line is malformed, or no source file is left.
    """
    source = os.fspath(source)
    if os.path.isdir(source):
        repos = [read_repository(source)]
    elif os.path.isfile(source) and source.endswith(".jsonl"):
        repos = read_repositories_jsonl(source)
    elif not os.path.exists(source):
        raise ValueError(f"{source} does not exist")
    else:
        raise ValueError(f"{source}: expected a directory (one repository) or a .jsonl file of repositories")
    reasons = collections.Counter(r for repo in repos for _, r in repo.skipped)
    empty = sum(not repo.files for repo in repos)
    if reasons or empty:
        summary = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
        log.warning("%s: files skipped: %s; repositories without source files: %d", source, summary or "none", empty)
    docs = [d for repo in repos for d in repository_documents(repo, unit=unit)]
    if not docs:
        raise ValueError(f"{source}: no source files (extensions read: {' '.join(sorted(_COMMENT))})")
    return docs
