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

from ragrt.bundle.atomic import atomic_open
from ragrt.corpus.documents import Document
from ragrt.errors import CorpusError, UserInputError

PYDOCS_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
SKIP = ("whatsnew/changelog",)    # a 3 MB list of commit messages, not documentation
MIN_SECTION_CHARS = 20
# Named sets of pages (path prefixes under the sources). "demo": the FAQ, tutorial, HOWTOs and
# language reference, about 4,000 passages of the 29,000, so `make demo` embeds in minutes and
# still answers its question from the FAQ.
SUBSETS = {"demo": ("faq/", "tutorial/", "howto/", "reference/")}

_ADORNMENT = re.compile(r"^([=\-~^*\"#+`'.:_])\1{2,}\s*$")
_ROLE = re.compile(r":([\w:.-]+):`([^`]*)`")
_LINK = re.compile(r"`([^`<]+?)\s*(?:<[^`>]+>)?`__?")
_LITERAL = re.compile(r"``([^`]+)``")
# *emphasis* and **strong**, but not `*args, **kwargs` or `a*b*c` in code
_EMPHASIS = re.compile(r"(?<![\w*\\])(\*\*?)(\w(?:[^*\n]*?[^\s*])?)\1(?![\w*])")
_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_FIELD = re.compile(r"^\s*:[\w -]+:( .*)?$")
# Directives whose argument and content are markup, not text.
_DROP_BLOCKS = {"index", "toctree", "only", "contents", "highlight", "sectionauthor", "moduleauthor", "module",
                "currentmodule", "program", "audit-event", "include", "literalinclude", "testsetup",
                "testcleanup", "raw", "image", "figure", "tabularcolumns"}
# Arguments that read as a phrase once rendered the way Sphinx does. Other arguments stay as they
# are (a signature such as `open(file, mode='r')`), except a code block's language.
_PHRASES = {"versionadded": "New in version {}.", "versionchanged": "Changed in version {}:",
            "deprecated": "Deprecated since version {}:", "availability": "Availability: {}",
            "deprecated-removed": "Deprecated since version {}, will be removed in version {}:"}
_LANGUAGE_ARG = {"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput"}
_ROLE_PREFIX = {"pep": "PEP ", "rfc": "RFC ", "issue": "bpo-", "gh": "gh-"}


def ensure_python_docs(source: Path = PYDOCS_SOURCES) -> Path:
    """The docs' folder, installing the Debian package first where it is missing and we may."""
    if source.is_dir():
        return source
    if not shutil.which("apt-get"):
        raise CorpusError(f"{source}: missing; it comes from Debian/Ubuntu's python3.11-doc package "
                          "(apt-get install -y python3.11-doc); or build from your own: ragrt export --corpus FILE")
    if os.geteuid() != 0:
        raise CorpusError(f"{source}: missing; install it with: sudo apt-get install -y python3.11-doc")
    print(f"[ragrt] {source} is missing; running: apt-get install -y python3.11-doc", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "python3.11-doc"]
    if subprocess.run(cmd, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env)    # a fresh container has no package lists
        if subprocess.run(cmd, env=env).returncode != 0:
            raise CorpusError("apt-get install -y python3.11-doc failed; install the package and run again")
    if not source.is_dir():
        raise CorpusError(f"{source}: still missing after installing python3.11-doc")
    return source


def _role_text(match: re.Match) -> str:
    role, inner = match.group(1).split(":")[-1], " ".join(match.group(2).split())
    explicit = re.match(r"(.*?)\s*<[^>]*>$", inner)
    if explicit and explicit.group(1):
        return explicit.group(1)
    if inner.startswith("~"):                       # :class:`~collections.OrderedDict` shows OrderedDict
        return inner.lstrip("~!").split(".")[-1]
    return _ROLE_PREFIX.get(role, "") + inner.lstrip("!")


def _directive_text(name: str, arg: str) -> str:
    if name in _LANGUAGE_ARG:
        return ""
    if name not in _PHRASES:
        return arg
    n = _PHRASES[name].count("{}")
    parts = arg.split(None, n) + [""] * (n + 1)
    return f"{_PHRASES[name].format(*parts[:n])} {parts[n]}".strip()


def clean_rst(text: str) -> str:
    """reST -> plain text: roles and links become their words, markup-only directives go."""
    out: list[str] = []
    dropping: int | None = None                     # the indent of a block being dropped
    for line in text.splitlines():
        indent, stripped = len(line) - len(line.lstrip()), line.strip()
        if dropping is not None:
            if not stripped or indent > dropping:
                continue
            dropping = None
        m = _DIRECTIVE.match(line)
        if m:
            name = m.group(2).split(":")[-1]
            if name in _DROP_BLOCKS:
                dropping = indent
            elif arg := _directive_text(name, m.group(3)):
                out.append(m.group(1) + arg)
            continue
        if stripped.startswith(".. ") or stripped == "..":     # comments, link targets, footnotes
            dropping = indent
        elif _ADORNMENT.match(line) or stripped == "::":        # transitions, bare literal-block markers
            continue
        elif _FIELD.match(line):
            continue                                            # directive options, field lists
        elif stripped.endswith("::"):                           # "Example::" reads "Example:"
            out.append(line.rstrip()[:-1].removesuffix(" :"))
        else:
            out.append(line.rstrip())
    text = _ROLE.sub(_role_text, "\n".join(out))               # after joining: roles may span lines
    text = _EMPHASIS.sub(r"\2", _LINK.sub(r"\1", _LITERAL.sub(r"\1", text)))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


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
        body = sections[-1][1]
        overlined = bool(body) and _ADORNMENT.match(body[-1]) is not None
        # only an overlined title may be inset; an indented line is code or a quote
        if line.strip() and (overlined or not line[0].isspace()) and not _ADORNMENT.match(line) \
                and _ADORNMENT.match(nxt) and len(nxt.rstrip()) >= len(line.rstrip()):
            if overlined:
                body.pop()                                     # the overline belongs to this title
            sections.append((line.strip(), [], ("^" if overlined else "") + nxt[0]))
            i += 2
            continue
        sections[-1][1].append(line)
        i += 1
    return [(title, "\n".join(body), style) for title, body, style in sections]


def subset_pages(subset: str | None) -> tuple[str, ...]:
    """The page prefixes of a named subset; ("",) (every page) for None."""
    if subset is None:
        return ("",)
    if subset not in SUBSETS:
        raise UserInputError(f"--subset must be one of {', '.join(SUBSETS)}, got {subset!r}")
    return SUBSETS[subset]


def python_docs_documents(source: Path = PYDOCS_SOURCES, pages: tuple[str, ...] = ("",)) -> Iterator[Document]:
    """The sections of the pages whose path starts with one of `pages`."""
    if not source.is_dir():
        raise CorpusError(f"{source}: no such directory")
    for path in sorted(source.rglob("*.rst.txt")):
        rel = path.relative_to(source).as_posix()[: -len(".rst.txt")]
        if rel.startswith(SKIP) or not rel.startswith(pages):
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


def write_python_docs_corpus(out: str | Path, source: Path = PYDOCS_SOURCES, subset: str | None = None) -> int:
    """Writes the corpus (every page, or a named subset of SUBSETS) as JSONL, atomically: a
    reader never sees half a file. Returns its size."""
    pages = subset_pages(subset)
    n = 0
    with atomic_open(out) as f:
        for doc in python_docs_documents(source, pages):
            f.write(json.dumps({"id": doc.id, "title": doc.title, "text": doc.text}, ensure_ascii=False) + "\n")
            n += 1
        if n == 0:
            raise CorpusError(f"{source}: no .rst.txt sources in it")
    return n
