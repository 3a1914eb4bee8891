"""The layout's rules, checked on the source itself: no import cycle among slimtune's modules (every import statement,
at the top or inside a function, counts), no file over 400 lines, no function over 80 lines, and each fact that used
to be written in several places written in exactly one."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80
LONG_FUNCTIONS: dict[str, str] = {}  # "module.function" -> why it may be longer (none today)


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module under src/slimtune (packages by their __init__)."""
    out = {}
    for p in sorted((SRC / "slimtune").rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the slimtune modules it imports (`from pkg import sub` counts as importing pkg.sub)."""
    mods = modules()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                deps |= {known(a.name) for a in node.names if a.name.startswith("slimtune")}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                if base.startswith("slimtune"):
                    deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else known(base) for a in node.names}
        graph[m] = deps - {m, None}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 80 and "slimtune.models.load" in graph["slimtune.train.build"]  # the walker sees imports
    assert cycles(graph) == []


def test_files_and_functions_are_short():
    long_files, long_funcs = [], []
    for m, p in modules().items():
        src = p.read_text()
        if src.count("\n") > MAX_FILE_LINES:
            long_files.append(f"{m}: {src.count(chr(10))} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and f"{m}.{node.name}" not in LONG_FUNCTIONS:
                    long_funcs.append(f"{m}.{node.name}: {n} lines")
    assert long_files == [] and long_funcs == []


# fact -> a pattern that only its definition matches; each must occur exactly once in src/slimtune
FACTS = {
    "PEFT's file prefix": r'= "base_model\.model\."',
    "the LoRA scale alpha / r or alpha / sqrt(r)": r"alpha / math\.sqrt\(r\)",
    "the DoRA-adapted weight": r"vector_norm\(\w+, dim=1\)\)\[:, None\] \*",
    "the dtype-name table": r'"bfloat16": torch\.bfloat16',
    "the optimizer list": r"^OPTIMIZERS = ",
    "the precision policies": r'^\s+"bf16-mixed": \(',
    "the quantization formats": r"^QUANT_FORMATS = ",
    "the formats with a group size": r"^GROUPED = ",
    "the cross-entropy": r"F\.cross_entropy\(",
    "the atomic folder write": r"tempfile\.mkdtemp\(",
    "the evaluation loop": r"s, n = s \+ ",
    "the run keys resume must keep": r"^RESUME_KEYS = ",
    "the packed 4-bit byte size": r"\(n \+ 1\) // 2 \+ absmax",
}
GONE = {  # dead code and the tables the option declarations replaced
    "targets.get_submodule": r"def get_submodule\(",
    "LoraConfig.scale": r"def scale\(self",
    "METHOD_KEYS / OPTION_FIELDS": r"METHOD_KEYS|OPTION_FIELDS",
}


def _count(pattern: str) -> list[str]:
    rx = re.compile(pattern, re.M)
    return [f"{p.relative_to(SRC)}:{i + 1}" for p in sorted((SRC / "slimtune").rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines()) if rx.search(line)]


@pytest.mark.parametrize("fact", list(FACTS))
def test_each_fact_has_one_home(fact):
    where = _count(FACTS[fact])
    assert len(where) == 1, (fact, where)


@pytest.mark.parametrize("what", list(GONE))
def test_dead_code_is_gone(what):
    assert _count(GONE[what]) == []
