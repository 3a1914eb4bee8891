"""The reliability sweep: over a hundred bad inputs (data files, configs and overrides, model folders, safetensors
headers, index.json, config.json, tokenizer files, .bin files, adapters, merge configs, quantize / convert, generate,
resume state, CLI flags) each go through the real CLI in a forked child, and each must end with exit code 2, exactly
one stderr line naming the file, key or flag, no traceback, and nothing written or changed on disk."""
from __future__ import annotations

from pathlib import Path

import pytest

from reliability_cases import CASES
from reliability_harness import one_clean_line, tree_hash

import reliability_cases_more  # noqa: F401  (adds its cases to CASES)

PWNED = Path("/tmp/slimtune-reliability-pwned")




def test_the_sweep_is_wide():
    cats = {c.category for c in CASES}
    assert cats == {"data", "config", "model", "adapter", "merge", "quantize/convert", "generate", "resume", "cli"}
    assert len(CASES) >= 80 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clean_line(case, ws, zygote, tmp_path):
    c = tmp_path / "case"
    c.mkdir()
    case.make(ws, c)
    before = tree_hash(ws, c)
    PWNED.unlink(missing_ok=True)
    r = zygote.run(case.argv(ws, c), cwd=c)
    line = one_clean_line(r)
    assert line.startswith("slimtune"), line
    for word in case.expect:
        assert word in line, (word, line)
    assert tree_hash(ws, c) == before, "a refused command changed files"
    assert not PWNED.exists(), "a pickle payload ran"
