"""mkdocs hooks: the site also shows files that live outside docs/ (the README as its home page,
benchmarks/README.md, SECURITY.md, and whatever repository file a page links to), each read where
it lives, so no page is copied and left to drift. Links are written as they work on GitHub,
relative to the file's place in the repository, and rewritten here to the file's place in the site;
a link to a missing file stays as written, so `mkdocs build --strict` fails on it."""
from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files

PAGES = ("README.md", "benchmarks/README.md", "SECURITY.md")    # in the nav, from outside docs/
LINK = re.compile(r"(\]\()([^)\s#]*)(#[^)\s]*)?(\))")

_real: dict[str, str] = {}      # site path -> repository path, for the files from outside docs/


def _site_path(repo_path: str) -> str:
    return repo_path[len("docs/"):] if repo_path.startswith("docs/") else repo_path


def _repo_path(site_path: str) -> str:
    return _real.get(site_path, "docs/" + site_path)


def _targets(repo_path: str, text: str) -> list[str]:
    """The repository paths of the relative links in `text`, a file at `repo_path`."""
    return [posixpath.normpath(posixpath.join(posixpath.dirname(repo_path), m.group(2)))
            for m in LINK.finditer(text) if m.group(2) and "://" not in m.group(2)
            and not m.group(2).startswith("mailto:")]


def on_files(files: Files, config) -> Files:
    root = Path(config.config_file_path).parent
    _real.clear()                # `mkdocs serve` calls this again on every rebuild
    todo = list(PAGES) + [t for f in files.documentation_pages()
                          for t in _targets("docs/" + f.src_uri, f.content_string)]
    while todo:
        path = todo.pop()
        if path.startswith("docs/") or path in _real.values() or not (root / path).is_file():
            continue
        _real[_site_path(path)] = path
        files.append(File.generated(config, path, abs_src_path=str(root / path)))
        if path.endswith(".md"):
            todo += _targets(path, (root / path).read_text(encoding="utf-8"))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    here = page.file.src_uri
    real = _repo_path(here)

    def moved(m: re.Match) -> str:
        link, anchor = m.group(2), m.group(3) or ""
        if not link or "://" in link or link.startswith("mailto:"):
            return m.group(0)
        target = posixpath.normpath(posixpath.join(posixpath.dirname(real), link))
        site = _site_path(target)
        if not (target.startswith("docs/") or site in _real):
            return m.group(0)
        return f"{m.group(1)}{posixpath.relpath(site, posixpath.dirname(here) or '.')}{anchor}{m.group(4)}"

    return LINK.sub(moved, markdown)
