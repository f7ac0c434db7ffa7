"""The words around the engine: the README's shape, the docs site's build, and the docs against
the code they describe (the CLI's options, the server's limits)."""
import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

from ragrt.cli import build_parser
from ragrt.serve.config import ServerConfig
from ragrt.serve.schemas import MAX_TEXT

ROOT = Path(__file__).resolve().parents[1]


def test_the_readme_is_short_and_opens_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    block = lines[lines.index("```bash") + 1:lines.index("```")]
    assert [line.split("#")[0].strip() for line in block] == ["make demo", "make test"]


def test_the_docs_site_builds_strictly(tmp_path):
    """A broken link or anchor, or a page missing from the nav, fails the build."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})    # mkdocs-material's banner
    assert done.returncode == 0, done.stderr
    home = (tmp_path / "index.html").read_text()
    assert "make demo" in home and 'href="install/#what-make-demo-does"' in home
    assert (tmp_path / "benchmarks" / "index.html").is_file() and (tmp_path / "img" / "web.png").is_file()


def commands(parser: argparse.ArgumentParser, prefix: str = "ragrt"):
    """(`ragrt COMMAND [ACTION]`, its parser) for every command that takes options."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
    for sub in subs:
        for name, child in sub.choices.items():
            yield from commands(child, f"{prefix} {name}")


def synopsis() -> dict[str, str]:
    """docs/cli.md's first code block, each command with its continuation lines."""
    text = (ROOT / "docs" / "cli.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    entries: dict[str, str] = {}
    for line in block.splitlines():
        if line.startswith("ragrt "):
            words = line.split()
            name = " ".join(words[:3] if words[1] == "index" else words[:2])
            entries[name] = line
        else:
            entries[name] += " " + line.strip()
    return entries


def test_the_cli_synopsis_lists_every_command_and_option():
    documented = synopsis()
    parsed = dict(commands(build_parser()))
    assert set(documented) == set(parsed)
    for name, parser in parsed.items():
        options = {max(a.option_strings, key=len) for a in parser._actions if a.option_strings} - {"--help", "--log-level"}
        words = set(re.findall(r"--[a-z0-9-]+", documented[name]))
        assert options <= words, f"{name}: {sorted(options - words)} missing from docs/cli.md"
        assert words <= options, f"{name}: {sorted(words - options)} in docs/cli.md but not in the parser"


def test_the_server_limits_are_documented():
    server = (ROOT / "docs" / "server.md").read_text()
    assert f"{MAX_TEXT:,} characters" in server
    assert ServerConfig.max_body_bytes == 1 << 20 and "1 MiB" in server and "| 413 |" in server
