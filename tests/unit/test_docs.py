"""The docs hold together: every relative link and anchor in README.md and docs/*.md resolves, every
`make X` they name is a Makefile target, every `python -m X` module and `python path/x.py` script
they name exists, every section that links a measured result (docs/results/) names a command,
`make help` lists every target, and the README's layout table matches the tree.

`doc_problems` is the checker; it runs on the real tree and on a copy with planted faults, which it
must report (so a checker that finds nothing cannot pass)."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^()\s]+(?:\([^()]*\))?)(?:\s+\"[^\"]*\")?\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
MAKE = re.compile(r"(?<![\w./-])make((?:\s+[^\s`]+)+)")
PY_MODULE = re.compile(r"(?<![\w/.-])(?:\S*/)?python3?\s+-m\s+([A-Za-z_][\w.]*)")
PY_SCRIPT = re.compile(r"(?<![\w/.-])(?:\S*/)?python3?\s+((?:[\w.-]+/)*[\w.-]+\.py)\b")
COMMAND = re.compile(r"python3? (?:-m )?[\w./]+|make [a-z][\w-]*|pytest")
TARGET = re.compile(r"^([A-Za-z0-9][\w.-]*(?:[ \t]+[A-Za-z0-9][\w.-]*)*)[ \t]*:(?![=:])", re.M)


def doc_files(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def split_code(text: str) -> tuple[list[str], list[str]]:
    """(prose lines with code spans blanked, code: fenced blocks' lines and inline code spans)."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if fenced:
            code.append(line)
            continue
        code += [m.group(2) for m in CODE_SPAN.finditer(line)]
        prose.append(CODE_SPAN.sub(lambda m: "x" * len(m.group(0)), line))
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: rendered text, lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link renders as its text
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a page's headings (outside fenced code), GitHub's '-1', '-2' on repeats."""
    seen: dict[str, int] = {}
    out, fenced = set(), False
    for line in path.read_text().splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            out.add(base if n == 0 else f"{base}-{n}")
            seen[base] = n + 1
    return out


def sections(text: str) -> list[tuple[str, str]]:
    """(heading, text) of each section, headings read outside fenced code."""
    out, heading, lines, fenced = [], "", [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        if not fenced and re.match(r"^#{1,6}\s", line):
            out.append((heading, "\n".join(lines)))
            heading, lines = line.lstrip("#").strip(), []
        lines.append(line)
    return out + [(heading, "\n".join(lines))]


def make_targets(makefile: Path) -> set[str]:
    """The Makefile's named targets (not file targets such as $(VENV)/.installed, not .PHONY)."""
    out = set()
    for m in TARGET.finditer(makefile.read_text()):
        out.update(t for t in m.group(1).split() if not t.startswith("."))
    return out


def module_exists(root: Path, module: str) -> bool:
    path = root / Path(*module.split("."))
    if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file() or (path / "__main__.py").is_file():
        return True
    if (root / module.split(".")[0]).exists():
        return False  # one of ours, but not there
    return importlib.util.find_spec(module) is not None  # a tool the docs run: pytest, pip


def doc_problems(root: Path) -> list[str]:
    """Every broken relative link or anchor, unknown make target, missing module or script in
    README.md and docs/*.md under ``root``, as 'file: what'."""
    problems = []
    targets = make_targets(root / "Makefile")
    for doc in doc_files(root):
        name = doc.relative_to(root)
        prose, code = split_code(doc.read_text())
        for heading, text in sections(doc.read_text()):  # a measured result names what measured it
            results = re.findall(r"\]\(((?:docs/)?results/[^)#]+)", text)
            if results and not COMMAND.search(text):
                problems.append(f"{name}: section {heading!r} links {results[0]} but names no command")
        for line in prose:
            for m in LINK.finditer(line):
                target = m.group(1)
                if re.match(r"^[a-z][a-z+.-]*:", target):  # http:, https:, mailto:
                    continue
                path, _, anchor = target.partition("#")
                dest = (doc.parent / path).resolve() if path else doc
                if not dest.exists():
                    problems.append(f"{name}: link to {target}: {path} does not exist")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    problems.append(f"{name}: link to {target}: no heading #{anchor} in {dest.name}")
        for snippet in code:
            for m in MAKE.finditer(snippet):
                words = [w for w in m.group(1).split() if "=" not in w and not w.startswith("-")]
                if words and re.fullmatch(r"[a-z][\w-]*", words[0]) and words[0] not in targets:
                    problems.append(f"{name}: `make {words[0]}`: no such target in the Makefile")
            for m in PY_MODULE.finditer(snippet):
                if not module_exists(root, m.group(1)):
                    problems.append(f"{name}: `python -m {m.group(1)}`: no such module")
            for m in PY_SCRIPT.finditer(snippet):
                if not (root / m.group(1)).is_file():
                    problems.append(f"{name}: `python {m.group(1)}`: no such script")
    return problems


def layout_problems(root: Path, top_level: set[str]) -> list[str]:
    """The README's layout table against the tree: each path it names exists, and each top-level
    entry of ``top_level`` is in it."""
    text = (root / "README.md").read_text()
    table = text[text.index("\n## Layout"):]
    named = {p for row in re.findall(r"^\| (.+?) \|", table, re.M) for p in re.findall(r"`([^`]+)`", row)}
    problems = [f"README layout: {p} does not exist" for p in sorted(named) if not (root / p).exists()]
    listed = {p.rstrip("/") for p in named}
    problems += [f"README layout: {t} is not in the table" for t in sorted(top_level - listed)]
    return problems


def tracked_top_level(root: Path) -> set[str]:
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout
    return {f.split("/")[0] for f in files.splitlines()
            if not f.startswith(".") and f.split("/")[0] not in ("README.md",)}


def test_the_docs_links_anchors_make_targets_modules_and_scripts_resolve():
    assert doc_problems(ROOT) == []


def test_the_readme_layout_table_matches_the_tree():
    assert layout_problems(ROOT, tracked_top_level(ROOT)) == []


def test_the_readme_is_a_landing_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 160
    prose, _ = split_code("\n".join(lines))
    long = [line for line in prose if len(line) > 120]
    assert long == []


def test_make_help_lists_every_target():
    out = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    listed = set(re.findall(r"^make ([\w-]+)", out, re.M))
    assert make_targets(ROOT / "Makefile") - listed == set()


@pytest.fixture
def tree_copy(tmp_path):
    """README.md and docs/ copied (the files the checker reads and links point to), everything else
    at the top level linked."""
    for entry in ROOT.iterdir():
        if entry.name in ("README.md", "docs", ".git", ".venv"):
            continue
        (tmp_path / entry.name).symlink_to(entry)
    shutil.copy2(ROOT / "README.md", tmp_path / "README.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    return tmp_path


def test_the_checker_reports_what_the_fixture_plants(tree_copy):
    assert doc_problems(tree_copy) == []  # the copy is as good as the tree
    readme = tree_copy / "README.md"
    readme.write_text(readme.read_text() + "\nSee [the gone page](docs/gone.md) and [a heading](docs/api.md#no-such).\n"
                      "\n```bash\nmake serv\npython -m bench.no_such_bench\npython calibration/no_such.py\n```\n")
    page = tree_copy / "docs" / "api.md"
    page.write_text(page.read_text() + "\nBack to [the results](results/gone.json) and [this page](#tokens-gone).\n"
                    "\n## A figure from nowhere\n\n12.3 img/s ([benchmarks.json](results/benchmarks.json)).\n")
    assert doc_problems(tree_copy) == [
        "README.md: link to docs/gone.md: docs/gone.md does not exist",
        "README.md: link to docs/api.md#no-such: no heading #no-such in api.md",
        "README.md: `make serv`: no such target in the Makefile",
        "README.md: `python -m bench.no_such_bench`: no such module",
        "README.md: `python calibration/no_such.py`: no such script",
        "docs/api.md: section 'A figure from nowhere' links results/benchmarks.json but names no command",
        "docs/api.md: link to results/gone.json: results/gone.json does not exist",
        "docs/api.md: link to #tokens-gone: no heading #tokens-gone in api.md",
    ]


def test_github_slugs():
    assert slug("Open Inference Protocol (v2)") == "open-inference-protocol-v2"
    assert slug("Overload: open-loop arrivals at 1×, 2× and 4× saturation") == \
        "overload-open-loop-arrivals-at-1-2-and-4-saturation"
    assert slug("Server tuning (`python -m bench.server_tuning`)") == "server-tuning-python--m-benchserver_tuning"
    assert slug("han1000: printed Han characters") == "han1000-printed-han-characters"
