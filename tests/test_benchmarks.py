"""The benchmark scripts' own machinery (not their figures: those live in benchmarks/results)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paper():
    spec = importlib.util.spec_from_file_location("paper_bench", ROOT / "benchmarks" / "paper.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_paper_cache_shared_by_two_invocations_keeps_both_results(paper, tmp_path):
    # Two processes opened the cache before either saved: each save must add to the file,
    # not replace it with the process's own stale view.
    path = tmp_path / "paper-cache-full.json"
    first, second = paper.Cache(path), paper.Cache(path)
    assert first.get("a", lambda: {"mean": 1.0}) == {"mean": 1.0}
    assert second.get("b", lambda: {"mean": 2.0}) == {"mean": 2.0}
    assert json.loads(path.read_text()) == {"a": {"mean": 1.0}, "b": {"mean": 2.0}}
    calls = []
    assert paper.Cache(path).get("a", lambda: calls.append(1)) == {"mean": 1.0}
    assert not calls  # a cached result is never recomputed
    with pytest.raises(paper.Missing):
        paper.Cache(path).get("c")
