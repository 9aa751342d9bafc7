"""Repository-level data: import parsing and resolution, Algorithm 1 ordering, documents, bad input, pipeline."""

import json
import logging
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsjax.config import ConfigError
from dsjax.data import ROW_KEYS, ByteTokenizer, make_pretrain_iterator
from dsjax.data.fim import fim_mode, undo_fim
from dsjax.data.repo import (
    SourceFile,
    file_block,
    import_graph,
    load_repository_corpus,
    make_repository,
    order_files,
    read_repositories_jsonl,
    read_repository,
    repository_documents,
)
from dsjax.train.loop import load_documents

BYTE = ByteTokenizer()


def _repo(files: dict, name="r"):
    return make_repository(name, files.items())


def _write(root, files: dict):
    for path, content in files.items():
        full = root / path
        full.parent.mkdir(parents=True, exist_ok=True)
        (full.write_bytes if isinstance(content, bytes) else full.write_text)(content)
    return root


def _order(files: dict):
    return order_files(import_graph(_repo(files)))


# --- ordering ------------------------------------------------------------------------------------------------


def test_chain_diamond_and_cycle_orders():
    # Path order is the reverse of dependency order, so a sort by name would fail.
    assert _order({"a.py": "import b\n", "b.py": "import c\n", "c.py": "x = 1\n"}) == [["c.py", "b.py", "a.py"]]
    diamond = {"a_top.py": "import m_left, m_right\n", "m_left.py": "import z_base\n",
               "m_right.py": "from z_base import x\n", "z_base.py": "x = 1\n"}  # fmt: skip
    assert _order(diamond) == [["z_base.py", "m_left.py", "m_right.py", "a_top.py"]]  # tie: smallest path first
    # Cycle x <-> y plus z -> x: every in-degree is 1, so the tie-break takes x; then y and z are free.
    cycle = {"x.py": "import y\n", "y.py": "import x\n", "z.py": "import x\n"}
    assert _order(cycle) == [["x.py", "y.py", "z.py"]]
    # Unconnected files are separate subgraphs, in the order of their smallest path.
    assert _order({"q.py": "import p\n", "p.py": "", "a.py": "", "self.py": "import self\n"}) == [
        ["a.py"],
        ["p.py", "q.py"],
        ["self.py"],
    ]


def test_order_files_rejects_unknown_nodes():
    with pytest.raises(ValueError, match="a.py imports b.py, which is not in the graph"):
        order_files({"a.py": {"b.py"}})


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 14), st.data())
def test_order_invariants_on_random_repositories(n, data):
    """Random import graphs written as real Python files: every file once, every import edge respected when the
    graph is acyclic, subgraphs = weakly connected components, independent of insertion order."""
    acyclic = data.draw(st.booleans())
    names = data.draw(st.permutations([f"m{i:02d}" for i in range(n)]))  # name order unrelated to edges
    edges = {
        (i, j)
        for i in range(n)
        for j in range(n)
        if i != j and (j < i or not acyclic) and data.draw(st.integers(0, 3)) == 0
    }
    files = {f"{names[i]}.py": "".join(f"import {names[j]}\n" for i2, j in sorted(edges) if i2 == i) for i in range(n)}
    graph = import_graph(_repo(files))
    assert graph == {f"{names[i]}.py": {f"{names[j]}.py" for i2, j in edges if i2 == i} for i in range(n)}
    orders = order_files(graph)
    flat = [p for g in orders for p in g]
    assert sorted(flat) == sorted(files)
    position = {p: k for k, p in enumerate(flat)}
    if acyclic:
        assert all(position[b] < position[a] for a, deps in graph.items() for b in deps)
    group = {p: k for k, g in enumerate(orders) for p in g}
    assert all(group[a] == group[b] for a, deps in graph.items() for b in deps)
    assert [min(g) for g in orders] == sorted(min(g) for g in orders)
    shuffled = dict(reversed(list(graph.items())))
    assert order_files(shuffled) == orders


# --- import resolution -----------------------------------------------------------------------------------------


def test_python_packages_and_relative_imports():
    repo = _repo({
        "pkg/__init__.py": "from .core import Core\nVERSION = 1\n",
        "pkg/core.py": "from .util import helper\nfrom . import consts\nimport os, sys\n",
        "pkg/util.py": "def helper(): pass\n",
        "pkg/consts.py": "A = 1\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/deep.py": "from ..util import helper\nfrom .... import outside\nfrom .missing import x\n",
        "main.py": "import pkg.sub.deep\nfrom pkg import core, VERSION\nimport pkg.nothing.here\n",
        "lazy.py": "def f():\n    try:\n        import pkg.util as u\n    except ImportError:\n        pass\n",
    })  # fmt: skip
    assert import_graph(repo) == {
        "pkg/__init__.py": {"pkg/core.py"},
        "pkg/core.py": {"pkg/util.py", "pkg/consts.py"},
        "pkg/util.py": set(),
        "pkg/consts.py": set(),
        "pkg/sub/__init__.py": set(),
        "pkg/sub/deep.py": {"pkg/util.py"},  # climbing out of the repository and missing modules add nothing
        # `from pkg import core, VERSION`: core is a submodule, VERSION a name in pkg/__init__.py; a module
        # only partly in the repository resolves to its package.
        "main.py": {"pkg/sub/deep.py", "pkg/core.py", "pkg/__init__.py"},
        "lazy.py": {"pkg/util.py"},  # imports inside functions and try blocks count
    }


def test_python_source_roots_and_unparseable_files():
    repo = _repo({
        "src/lib/__init__.py": "",
        "src/lib/a.py": "X = 1\n",
        "tests/helper.py": "",
        "tests/test_a.py": "from lib.a import X\nimport helper\n",
        "scripts/run.py": 'print "python 2"\nimport lib.a\nfrom lib import (a,\n    b)\n',
        "lib/__init__.py": "",  # a second lib/ at the root: the shallower root wins for other importers
        "lib/a.py": "",
        "other.py": "import lib.a\n",
    })  # fmt: skip
    graph = import_graph(repo)
    # A file's own directory comes first when it is a root (a script's directory is sys.path[0]).
    assert graph["tests/test_a.py"] == {"lib/a.py", "tests/helper.py"}
    assert graph["other.py"] == {"lib/a.py"}
    # The Python 2 file does not parse; the line patterns still find both imports.
    assert graph["scripts/run.py"] == {"lib/a.py"}
    repo2 = _repo({"src/lib/__init__.py": "", "src/lib/a.py": "", "tests/t.py": "from lib.a import X\n"})
    assert import_graph(repo2)["tests/t.py"] == {"src/lib/a.py"}  # src/ layout


def test_c_js_java_imports():
    repo = _repo({
        "src/main.c": '#include <stdio.h>\n#include "util.h"\n# include <lib/api.h>\n',
        "src/util.h": "int f(void);\n",
        "include/lib/api.h": '#include "../../src/util.h"\n',
        "web/app.js": "import { x } from './util';\nconst c = require('../shared/conf');\nimport React from 'react';\n",
        "web/util.js": "export const x = 1;\n",
        "shared/conf/index.js": "module.exports = {};\n",
        "web/main.ts": "import './polyfill.js';\nexport * from \"./app\";\nconst m = await import('./lazy');\n",
        "web/polyfill.ts": "",
        "web/lazy.tsx": "",
        "j/src/main/java/com/ex/App.java": "import com.ex.util.Strings;\nimport static com.ex.util.Strings.join;\n"
                                          "import java.util.List;\nimport com.ex.model.*;\n",
        "j/src/main/java/com/ex/util/Strings.java": "package com.ex.util;\n",
        "q.sql": "select 1;\n",
    })  # fmt: skip
    graph = import_graph(repo)
    assert graph["src/main.c"] == {"src/util.h", "include/lib/api.h"}
    assert graph["include/lib/api.h"] == {"src/util.h"}
    assert graph["web/app.js"] == {"web/util.js", "shared/conf/index.js"}
    assert graph["web/main.ts"] == {"web/polyfill.ts", "web/app.js", "web/lazy.tsx"}
    assert graph["j/src/main/java/com/ex/App.java"] == {"j/src/main/java/com/ex/util/Strings.java"}
    assert graph["q.sql"] == set()


# --- documents -----------------------------------------------------------------------------------------------


def test_headers_and_documents():
    assert file_block(SourceFile("pkg/mod.py", "x = 1")) == "# pkg/mod.py\nx = 1\n"
    assert file_block(SourceFile("src/a.c", "int x;\n")) == "// src/a.c\nint x;\n"
    assert file_block(SourceFile("web/a.ts", "")) == "// web/a.ts\n"
    assert file_block(SourceFile("db/q.sql", "select 1;\n")) == "-- db/q.sql\nselect 1;\n"
    files = {"b.py": "import c\n", "c.py": "C = 1", "lone.c": "int main;\n", "README.md": "# docs\n"}
    repo = _repo(files)
    assert [f.path for f in repo.files] == ["b.py", "c.py", "lone.c"]
    assert repo.skipped == (("README.md", "not a source file"),)
    assert repository_documents(repo) == ["# c.py\nC = 1\n\n# b.py\nimport c\n", "// lone.c\nint main;\n"]
    whole = repository_documents(repo, unit="repository")
    assert whole == ["# c.py\nC = 1\n\n# b.py\nimport c\n\n// lone.c\nint main;\n"]
    with pytest.raises(ValueError, match="unit must be one of"):
        repository_documents(repo, unit="file")


def test_read_repository_skips_bad_files(tmp_path):
    root = _write(tmp_path / "proj", {
        "app/__init__.py": "",
        "app/main.py": "from app import models\n",
        "app/models.py": "class M: ...\n",
        "app/latin1.py": "s = 'caf\xe9'\n".encode("latin-1"),
        "app/blob.py": b"x = 1\x00\x00",
        "app/big.py": "x = 1\n" * 100,
        "notes.txt": "hello",
        ".git/config.py": "secret = 1\n",
        "node_modules/m/index.js": "",
        "__pycache__/x.py": "",
    })  # fmt: skip
    os.symlink(root / "app" / "models.py", root / "app" / "link.py")
    repo = read_repository(root, max_file_bytes=200)
    assert repo.name == "proj"
    assert [f.path for f in repo.files] == ["app/__init__.py", "app/main.py", "app/models.py"]
    assert dict(repo.skipped) == {
        "app/big.py": "too large", "app/link.py": "symlink", "notes.txt": "not a source file",
        "app/latin1.py": "not UTF-8", "app/blob.py": "binary (NUL byte)",
    }  # fmt: skip
    # `from app import models` names a submodule: edges go to the most specific module, not to the package's
    # __init__.py (which Python also runs), so app/__init__.py forms its own subgraph.
    assert repository_documents(repo) == [
        "# app/__init__.py\n",
        "# app/models.py\nclass M: ...\n\n# app/main.py\nfrom app import models\n",
    ]
    with pytest.raises(ValueError, match="does not exist"):
        read_repository(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a directory"):
        read_repository(root / "notes.txt")


def test_jsonl_repositories_and_errors(tmp_path, caplog):
    path = tmp_path / "repos.jsonl"
    lines = [
        {"repo": "one", "files": [{"path": "a.py", "content": "import b\n"}, {"path": "./b.py", "content": ""}]},
        {"repo": "docs-only", "files": [{"path": "README.md", "content": "hi"}]},
        {"repo": "two", "files": [{"path": "../evil.py", "content": ""}, {"path": "x.js", "content": "1;"},
                                  {"path": "x.js", "content": "2;"}]},
    ]  # fmt: skip
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    repos = read_repositories_jsonl(path)
    assert [r.name for r in repos] == ["one", "docs-only", "two"]
    assert repos[2].skipped == (("../evil.py", "invalid path"), ("x.js", "duplicate path"))
    with caplog.at_level(logging.WARNING, logger="dsjax.data.repo"):
        docs = load_repository_corpus(path)
    assert docs == ["# b.py\n\n# a.py\nimport b\n", "// x.js\n1;\n"]
    assert "1 duplicate path, 1 invalid path, 1 not a source file" in caplog.text
    assert "repositories without source files: 1" in caplog.text
    for bad, message in [
        ("{not json", r"repos.jsonl:1: invalid JSON"),
        ('{"repo": "x"}', r'repos.jsonl:1: expected \{"repo": str, "files"'),
        ('{"repo": "x", "files": [{"path": "a.py", "content": 3}]}', r"files\[0\] needs a string 'path' and a string"),
    ]:
        path.write_text(bad)
        with pytest.raises(ValueError, match=message):
            load_repository_corpus(path)
    path.write_text(json.dumps(lines[1]))
    with pytest.raises(ValueError, match="no source files"):
        load_repository_corpus(path)
    (tmp_path / "x.txt").write_text("")
    with pytest.raises(ValueError, match="expected a directory"):
        load_repository_corpus(tmp_path / "x.txt")


def test_load_documents_repo_source(tmp_path):
    root = _write(tmp_path / "r", {"m.py": "import n\n", "n.py": "N = 1\n"})
    assert load_documents(f"repo:{root}", 4000, 0) == ["# n.py\nN = 1\n\n# m.py\nimport n\n"]
    with pytest.raises(ConfigError, match="data.corpus: .*missing does not exist"):
        load_documents(f"repo:{tmp_path / 'missing'}", 4000, 0)
    with pytest.raises(ConfigError, match="data.corpus: .*no source files"):
        load_documents(f"repo:{_write(tmp_path / 'empty', {'a.md': 'x'})}", 4000, 0)


def test_repository_through_fim_and_packing(tmp_path):
    """A repository directory through tokenize + FIM (both layouts) + packing: every document comes back."""
    files = {f"pkg/m{i}.py": f"from pkg import m{i - 1}\n" * (i % 3 > 0) + f"V{i} = {i}\n" * 20 for i in range(12)}
    files |= {"pkg/__init__.py": "", "lib/x.c": '#include "x.h"\nint y;\n', "lib/x.h": "int x;\n"}
    docs = load_repository_corpus(_write(tmp_path / "repo", files))
    assert len(docs) == 6  # chains m0-m1-m2, ..., m9-m10-m11, the lone pkg/__init__.py and the C pair
    batches = list(make_pretrain_iterator(docs, BYTE, batch_size=2, seq_len=96, seed=0, process_count=1,
                                          num_epochs=1, fim_rate=1.0, fim_spm_rate=0.5))  # fmt: skip
    rows = [{k: b[k][i] for k in ROW_KEYS} for b in batches for i in range(2)]
    tokens = np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in rows])
    pieces = [p[1:-1] for p in np.split(tokens, np.flatnonzero(tokens == BYTE.bos_id)[1:])]
    assert sorted(BYTE.decode(undo_fim(p, BYTE).tolist()) for p in pieces) == sorted(docs)
    assert {fim_mode(p, BYTE) for p in pieces} <= {"psm", "spm"}
    assert len(tokens) == sum(len(d.encode()) + 5 for d in docs)
