"""The default demo corpus: the Python 3.11 documentation from Debian's `python3.11-doc`.

One document per section of each page, with reST markup reduced to readable text.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

from engine.errors import CorpusError

from .corpus import Document

PYDOCS_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
SKIP = ("whatsnew/changelog",)    # a 3 MB list of commit messages, not documentation
MIN_SECTION_CHARS = 20

_ADORNMENT = re.compile(r"^([=\-~^*\"#+`'.:_])\1{2,}\s*$")
_ROLE = re.compile(r":[\w:.-]+:`([^`]*)`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`__?")
_LITERAL = re.compile(r"``([^`]+)``")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_DROP_BLOCKS = {"index", "toctree", "only", "contents", "highlight", "sectionauthor", "moduleauthor",
                "testsetup", "testcleanup", "raw", "image", "figure", "tabularcolumns"}


def ensure_python_docs(source: Path = PYDOCS_SOURCES) -> Path:
    """The docs' folder, installing the Debian package first where it is missing and we may."""
    if source.is_dir():
        return source
    fix = "apt-get install -y python3.11-doc"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise CorpusError(f"{source}: missing; install the Python docs as root: {fix}")
    print(f"[ragrt] {source} is missing; running: {fix}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "python3.11-doc"]
    if subprocess.run(cmd, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env)
        if subprocess.run(cmd, env=env).returncode != 0:
            raise CorpusError(f"{fix} failed; install the package and run again")
    if not source.is_dir():
        raise CorpusError(f"{source}: still missing after installing python3.11-doc")
    return source


def _role_text(match: re.Match) -> str:
    inner = match.group(1)
    explicit = re.match(r"(.*?)\s*<[^>]*>$", inner, re.S)
    if explicit and explicit.group(1):
        return explicit.group(1)
    return inner.lstrip("~!").split(".")[-1] if inner.startswith("~") else inner.lstrip("!")


def clean_rst(text: str) -> str:
    """reST -> plain text: roles and links become their words, markup-only directives go."""
    out: list[str] = []
    dropping_indent: int | None = None
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if dropping_indent is not None:
            if not line.strip() or indent > dropping_indent:
                continue
            dropping_indent = None
        m = _DIRECTIVE.match(line)
        if m:
            name = m.group(2).split(":")[-1]
            if name in _DROP_BLOCKS:
                dropping_indent = len(m.group(1))
                continue
            # A signature (.. function:: open(file)) or a note title stays as text.
            if m.group(3):
                out.append(m.group(1) + m.group(3))
            continue
        stripped = line.strip()
        if stripped.startswith(".. ") or stripped == "..":     # comments and link targets
            dropping_indent = indent
            continue
        if re.match(r"^\s*:[\w -]+:( .*)?$", line) and not stripped.startswith(":: "):
            continue                                            # directive options, field lists
        line = _ROLE.sub(_role_text, line)
        line = _LINK.sub(r"\1", line)
        line = _LITERAL.sub(r"\1", line)
        out.append(line.replace("::", ":") if stripped.endswith("::") else line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def clean_title(title: str) -> str:
    title = _LITERAL.sub(r"\1", _ROLE.sub(_role_text, title))
    return re.sub(r"\s+-{2,3}\s+", " — ", title).strip()


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"


def split_sections(text: str) -> list[tuple[str, str, str]]:
    """(title, body, adornment) for each section: a title line underlined (and maybe overlined)
    by punctuation. The adornment ("=" or "-" ...) tells the section's level within its page."""
    lines = text.splitlines()
    sections: list[tuple[str, list[str], str]] = [("", [], "")]
    i = 0
    while i < len(lines):
        line = lines[i]
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and not _ADORNMENT.match(line) and _ADORNMENT.match(nxt) \
                and len(nxt.rstrip()) >= len(line.rstrip()):
            body = sections[-1][1]
            overlined = bool(body) and _ADORNMENT.match(body[-1]) is not None
            if overlined:
                body.pop()                                     # the overline belongs to this title
            sections.append((line.strip(), [], ("^" if overlined else "") + nxt[0]))
            i += 2
            continue
        sections[-1][1].append(line)
        i += 1
    return [(title, "\n".join(body), style) for title, body, style in sections]


def python_docs_documents(source: Path = PYDOCS_SOURCES) -> Iterator[Document]:
    for path in sorted(source.rglob("*.rst.txt")):
        rel = path.relative_to(source).as_posix()[: -len(".rst.txt")]
        if rel.startswith(SKIP):
            continue
        sections = [(clean_title(t), body) for t, body, _ in
                    split_sections(path.read_text(encoding="utf-8", errors="replace"))]
        page = next((t for t, _ in sections if t), rel)
        used: dict[str, int] = {}
        for title, body in sections:
            text = clean_rst(body)
            if len(text) < MIN_SECTION_CHARS:
                continue
            slug = _slug(title or page)
            used[slug] = used.get(slug, 0) + 1
            if used[slug] > 1:
                slug = f"{slug}-{used[slug]}"
            full_title = page if not title or title == page else f"{page} — {title}"
            yield Document(f"{rel}#{slug}", text, full_title)


def write_python_docs_corpus(out: str | Path, source: Path = PYDOCS_SOURCES) -> int:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in python_docs_documents(source):
            f.write(json.dumps({"id": doc.id, "title": doc.title, "text": doc.text}, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, out)
    return n
