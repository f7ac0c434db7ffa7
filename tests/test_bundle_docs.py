"""docs/bundle.md documents every field of the bundle's dataclasses, and only those, at the current version.

A table documents a dataclass when the heading above it ends with the class name in
backticks in parentheses, e.g. "### `rag` (`RagDefaults`)"; the backticked names in the
first column of its rows are fields.
"""
import dataclasses
import re
import typing
from pathlib import Path

from ragrt.bundle.manifest import SCHEMA_VERSION, GenerationSpec, Manifest

DOC = Path(__file__).resolve().parents[1] / "docs" / "bundle.md"
_HEADING_CLASS = re.compile(r"\(`(\w+)`\)\s*$")
_TITLE = re.compile(r"^# The ragrt bundle, schema version (\d+)$", re.MULTILINE)


def schema_dataclasses() -> dict[str, type]:
    """Every dataclass a manifest or a generation.json is made of, found through the type hints."""
    found: dict[str, type] = {}

    def visit(tp) -> None:
        for arg in typing.get_args(tp):
            visit(arg)
        if dataclasses.is_dataclass(tp) and tp.__name__ not in found:
            found[tp.__name__] = tp
            for hint in typing.get_type_hints(tp).values():
                visit(hint)

    visit(Manifest)
    visit(GenerationSpec)
    return found


def documented_fields(text: str) -> dict[str, set[str]]:
    """{class name: the field names its table lists}."""
    tables: dict[str, set[str]] = {}
    current, fenced = None, False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif fenced:
            continue
        elif line.startswith("#"):
            match = _HEADING_CLASS.search(line)
            current = match.group(1) if match else None
            if current:
                tables.setdefault(current, set())
        elif current and line.startswith("|"):
            tables[current] |= set(re.findall(r"`(\w+)`", line.split("|")[1]))
    return tables


def doc_problems(text: str) -> list[str]:
    problems = []
    title = _TITLE.search(text)
    if not title or int(title.group(1)) != SCHEMA_VERSION:
        problems.append(f"the title must say schema version {SCHEMA_VERSION} (SCHEMA_VERSION)")
    documented = documented_fields(text)
    for name, cls in sorted(schema_dataclasses().items()):
        if name not in documented:
            problems.append(f"no table for {name}: add one under a heading ending in (`{name}`)")
            continue
        fields = {f.name for f in dataclasses.fields(cls)}
        problems += [f"{name}.{f} is not documented: add a row to the (`{name}`) table"
                     for f in sorted(fields - documented[name])]
        problems += [f"{name}.{f} is documented but {name} has no such field"
                     for f in sorted(documented[name] - fields)]
    problems += [f"a table documents {name}, which is not a dataclass of the bundle"
                 for name in sorted(set(documented) - set(schema_dataclasses()))]
    return problems


def test_docs_match_the_dataclasses_and_the_version():
    problems = doc_problems(DOC.read_text(encoding="utf-8"))
    assert not problems, "docs/bundle.md:\n" + "\n".join(problems)


def test_the_reflection_reaches_every_part_of_the_schema():
    assert {"Manifest", "FileEntry", "ModelSource", "EncoderSpec", "GeneratorSpec", "GeneratorIO", "PromptSpec",
            "TaskPrompt", "ChunkingSpec", "RagDefaults", "CorpusProvenance", "ParityReport", "EncoderParity",
            "GreedyAgreement", "GenerationSpec", "IndexSpec", "PassagesSpec"} <= set(schema_dataclasses())


def test_a_missing_or_stray_row_and_a_stale_version_are_named():
    text = DOC.read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| `max_new_tokens` |"))
    broken = (text.replace(row + "\n", "")
              .replace("| `overlap` |", "| `overlap_tokens` |")
              .replace(f"schema version {SCHEMA_VERSION}\n", f"schema version {SCHEMA_VERSION - 1}\n", 1)
              .replace("(`TaskPrompt`)", "(`TaskPrompts`)"))
    assert doc_problems(broken) == [
        f"the title must say schema version {SCHEMA_VERSION} (SCHEMA_VERSION)",
        "ChunkingSpec.overlap is not documented: add a row to the (`ChunkingSpec`) table",
        "ChunkingSpec.overlap_tokens is documented but ChunkingSpec has no such field",
        "RagDefaults.max_new_tokens is not documented: add a row to the (`RagDefaults`) table",
        "no table for TaskPrompt: add one under a heading ending in (`TaskPrompt`)",
        "a table documents TaskPrompts, which is not a dataclass of the bundle",
    ]
