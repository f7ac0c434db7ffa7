"""The `ragrt` command on a tiny bundle: answers, JSON shape, and one-line errors with exit 2."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ragrt(*args, check_rc=None):
    out = subprocess.run([sys.executable, "-m", "engine.cli", *map(str, args)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert out.returncode == check_rc, out.stderr
    return out


def one_line_error(out, pattern):
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert pattern in lines[0], lines[0]


@pytest.mark.parametrize("mode", ["concat", "token", "sequence"])
def test_ask_json(tiny_bundle, mode):
    out = ragrt("ask", "--bundle", tiny_bundle, "--json", "--k", "3", "--mode", mode, "--max-new-tokens", "8",
                "How do I copy a list?", check_rc=0)
    ans = json.loads(out.stdout)
    assert set(ans) >= {"answer", "sources", "new_tokens", "prompt_tokens", "timings_ms"}
    assert set(ans["timings_ms"]) == {"embed", "retrieve", "prefill", "decode", "total"}
    assert len(ans["sources"]) == 3
    assert set(ans["sources"][0]) == {"id", "title", "score", "prob", "text"}
    assert sum(s["prob"] for s in ans["sources"]) == pytest.approx(1.0, abs=1e-6)
    assert 0 < ans["new_tokens"] <= 8 and ans["prompt_tokens"] > 0
    assert [s["score"] for s in ans["sources"]] == sorted((s["score"] for s in ans["sources"]), reverse=True)


def test_ask_text_and_info_and_verify(tiny_bundle):
    out = ragrt("ask", "--bundle", tiny_bundle, "--max-new-tokens", "4", "What is the GIL?", check_rc=0)
    assert "sources:" in out.stdout
    assert "passages" in ragrt("info", tiny_bundle, check_rc=0).stdout
    assert "match their sha256" in ragrt("verify", tiny_bundle, check_rc=0).stdout


def test_user_errors_are_one_line_with_exit_2(tiny_bundle, tmp_path):
    one_line_error(ragrt("ask", "--bundle", tmp_path / "nope", "q"), "no such bundle directory")
    one_line_error(ragrt("ask", "--bundle", tiny_bundle, "   "), "the question is empty")
    one_line_error(ragrt("ask", "--bundle", tiny_bundle, "--k", "0", "q"), "k must be an integer from 1")
    one_line_error(ragrt("ask", "--bundle", tiny_bundle, "--max-new-tokens", "100000", "q"), "max_new_tokens must be")

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    target = broken / "generator" / "model.onnx"
    target.write_bytes(target.read_bytes()[:-10])
    one_line_error(ragrt("ask", "--bundle", broken, "q"), "model.onnx: size")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": \n')
    one_line_error(ragrt("export", "--corpus", bad, "--out", tmp_path / "b2"), "bad.jsonl:2")
    one_line_error(ragrt("export", "--corpus", tmp_path / "missing.jsonl", "--out", tmp_path / "b3"), "missing.jsonl")
    one_line_error(ragrt("export", "--corpus", bad, "--out", tiny_bundle), "already exists")


def test_verify_catches_one_flipped_byte_in_every_file(tiny_bundle, tmp_path):
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    assert len(manifest["files"]) >= 7
    for rel in manifest["files"]:
        copy = tmp_path / rel.replace("/", "_")
        shutil.copytree(tiny_bundle, copy)
        data = bytearray((copy / rel).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (copy / rel).write_bytes(bytes(data))
        one_line_error(ragrt("verify", copy), f"{rel}: sha256 does not match")
