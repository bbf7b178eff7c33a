"""Project hygiene: no import-path edits, no citation of files outside the repository, every distiller's paper
named, no absolute path in committed results, and tools import this clone's code through the editable install."""
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

from distillers import DISTILLERS

# Built from pieces so that this file does not match its own patterns.
PATH_EDIT = re.compile(r"\bsys\." + r"path\s*(\.\s*(insert|append|extend|remove)\b|\[|\+?=)")
OUTSIDE_CITATION = re.compile("|".join([r"REFERENCE" + r"\.md", r"DESIGN" + r"\.md", r"\.\./" + r"shared\b",
                                        r"/" + r"work/"]))
VENUE = re.compile(r"\b(NeurIPS|ICLR|ICCV|CVPR|ECCV|AAAI|ICML|TPAMI|arXiv)\b")
ABSOLUTE_PATH = re.compile(r"(?:^|[\s\"'(\[=,:])(?:/[\w.-]+){2,}|\b[A-Za-z]:\\")


def repo_files():
    """Tracked and new (not ignored) files of the clone, relative to its root."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return [path for path in out.splitlines() if os.path.isfile(os.path.join(REPO, path))]


def read(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return f.read()


def offending_lines(paths, pattern):
    return [f"{path}:{n}: {line.strip()}" for path in paths for n, line in enumerate(read(path).splitlines(), 1)
            if pattern.search(line)]


def test_no_import_path_edits_in_tools_or_tests():
    paths = [p for p in repo_files() if p.startswith(("tools/", "tests/")) and p.endswith(".py")]
    assert len(paths) > 20
    assert offending_lines(paths, PATH_EDIT) == []
    assert PATH_EDIT.search("sys." + "path.insert(0, REPO)") and PATH_EDIT.search("sys." + "path += [x]")
    assert not PATH_EDIT.search("os.path.insert_here") and not PATH_EDIT.search("sys.executable")


def test_no_citation_of_files_outside_the_repository():
    def cited(path):
        return (path.endswith((".py", ".yaml", ".yml", ".sh")) or path.startswith(".ci/") or path == "README.md"
                or path == "pyproject.toml")
    paths = [p for p in repo_files() if cited(p)]
    assert "README.md" in paths and ".ci/run" in paths and "tools/setup_env.sh" in paths
    assert offending_lines(paths, OUTSIDE_CITATION) == []
    assert OUTSIDE_CITATION.search("see " + "REFERENCE" + ".md §6") and OUTSIDE_CITATION.search("../" + "shared/x")


def test_every_registered_distiller_names_its_paper_and_venue():
    assert len(DISTILLERS) >= 12
    missing = {name: cls.__dict__.get("__doc__") for name, cls in DISTILLERS.items()
               if not VENUE.search(cls.__dict__.get("__doc__") or "")}
    assert missing == {}


def test_no_absolute_path_in_committed_results():
    paths = [p for p in repo_files() if p.startswith(("results/", "pretrained/"))
             and p.endswith((".json", ".csv", ".md", ".yaml", ".yml"))]
    assert any(p.endswith(".json") for p in paths) and any(p.endswith(".csv") for p in paths)
    assert offending_lines(paths, ABSOLUTE_PATH) == []
    for absolute in ('"checkpoint": "/data/runs/last.pth.tar"', "weights /usr/share/x.pth", "C:\\runs\\a.pth"):
        assert ABSOLUTE_PATH.search(absolute), absolute
    for relative in ('"checkpoint": "pair/kd/seed0/last.pth.tar"', "| 93.1 / 2.0 |", "img/s", "1/2/3"):
        assert not ABSOLUTE_PATH.search(relative), relative


@pytest.mark.slow
def test_a_tool_run_from_the_clone_imports_this_clones_packages(tmp_path):
    """`python tools/X.py` has tools/ first on its path, so the packages come from the editable install; it must
    point at this clone (tools/setup_env.sh re-installs when it points elsewhere)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-v", os.path.join(REPO, "tools", "build_cache.py"), "--help"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = re.findall(r"^# code object from '?(\S+?/(?:engine|kdcore|distillers)/\w+\.py)", done.stderr, re.M)
    assert any(path.endswith("engine/__init__.py") for path in loaded), done.stderr[-2000:]
    assert {os.path.dirname(os.path.dirname(os.path.realpath(p))) for p in loaded} == {os.path.realpath(REPO)}
