"""benchmarks/generation.py end to end on the tiny bundle: ragrt and PyTorch, each in its own
subprocess, written out as JSON, markdown and PNG; an engine that fails is reported, not fatal."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "generation.py"


def test_generation_benchmark_end_to_end(tiny_bundle, tiny_generator_dir, tmp_path):
    out = tmp_path / "gen.json"
    cmd = [sys.executable, str(SCRIPT), "--bundle", str(tiny_bundle), "--checkpoint", str(tiny_generator_dir),
           "--engines", "ragrt,pytorch", "--prompt-tokens", "48", "--new-tokens", "6", "--batch", "2",
           "--runs", "1", "--json", str(out), "--markdown", str(tmp_path / "gen.md"), "--plot", str(tmp_path / "gen.png")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    r = json.loads(out.read_text())
    assert r["threads"] == 2 and r["new_tokens"] == 6 and r["batch"] == 2
    assert r["prompt_tokens"] == len(r["prompt_ids"]) > 0
    assert set(r["engines"]) == {"pytorch", "ragrt-fp32"}
    for e in r["engines"].values():
        assert e["status"] == "ok", e
        for key in ("ttft_ms", "decode_tok_s_b1", "decode_tok_s_b8", "peak_rss_mb"):
            assert e[key] > 0, (key, e)
        assert len(e["tokens"]) == 6 and e["b8_rows_agree"]
        assert e["vs_pytorch"]["decode_b1"] > 0 and e["vs_genai_int4"] is None
    # fp32 on both sides: the same greedy tokens
    assert r["engines"]["ragrt-fp32"]["greedy_match"] == 6
    assert r["engines"]["pytorch"]["vs_pytorch"]["ttft"] == 1.0
    checks = {c["check"]: c["passed"] for c in r["acceptance"]}
    assert any("3x PyTorch" in c for c in checks) and any(p is None for p in checks.values())

    table = (tmp_path / "gen.md").read_text()
    assert "| ragrt fp32" in table and "| transformers PyTorch fp32 generate()" in table
    assert (tmp_path / "gen.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_engine_is_reported_not_raised():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import generation
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    result = generation.call_worker("prepare", {"engine": "no-such-engine", "checkpoint": "/nonexistent",
                                                "threads": 1}, timeout=120)
    assert result["status"].startswith("not available: prepare failed: ValueError: unknown engine")


def test_rounds_report_medians_keep_every_round_and_rotate_the_order(tiny_bundle, tiny_generator_dir, tmp_path):
    out = tmp_path / "gen.json"
    cmd = [sys.executable, str(SCRIPT), "--bundle", str(tiny_bundle), "--checkpoint", str(tiny_generator_dir),
           "--engines", "ragrt,pytorch", "--prompt-tokens", "48", "--new-tokens", "4", "--batch", "2",
           "--runs", "1", "--rounds", "3", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = done.stdout.split("round ")[1:]
    assert len(rounds) == 3
    firsts = [next(line for line in chunk.splitlines()[1:] if line.strip()).split()[0] for chunk in rounds]
    assert firsts[0] != firsts[1] and firsts[2] == firsts[0]   # each round starts one engine further on

    r = json.loads(out.read_text())
    e, ref = r["engines"]["ragrt-fp32"], r["engines"]["pytorch"]
    assert r["rounds"] == 3 and len(e["rounds"]) == 3
    for key in ("ttft_ms", "decode_tok_s_b1", "decode_tok_s_b8"):
        assert e[key] == sorted(x[key] for x in e["rounds"])[1]
    assert e["peak_rss_mb"] == max(x["peak_rss_mb"] for x in e["rounds"])
    held = sum(x["decode_tok_s_b1"] >= 3 * y["decode_tok_s_b1"] for x, y in zip(e["rounds"], ref["rounds"]))
    check = next(c for c in r["acceptance"] if c["check"].endswith("decode batch 1 >= 3x PyTorch"))
    assert check["figures"].endswith(f"; held in {held} of 3 rounds")


def test_drafts_run_the_engines_own_loop_at_the_same_count(tiny_bundle, tiny_generator_dir, tmp_path):
    """--drafts adds each bundle through `generate` with prompt-lookup drafts: as many tokens as the
    other engines (EOS banned until the count), batch 1 only, and its decode checked against genai."""
    out = tmp_path / "gen.json"
    cmd = [sys.executable, str(SCRIPT), "--bundle", str(tiny_bundle), "--checkpoint", str(tiny_generator_dir),
           "--engines", "ragrt", "--drafts", "--prompt-tokens", "48", "--new-tokens", "6", "--batch", "2",
           "--runs", "1", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    engines = json.loads(out.read_text())["engines"]
    assert set(engines) == {"ragrt-fp32", "ragrt-fp32-drafts"}
    drafts = engines["ragrt-fp32-drafts"]
    assert drafts["status"] == "ok" and drafts["label"].endswith(", drafts"), drafts
    assert len(drafts["tokens"]) == 6 and drafts["ttft_ms"] > 0 and drafts["decode_tok_s_b1"] > 0
    assert drafts["decode_tok_s_b8"] is None and "one row" in drafts["b8_note"]
    checks = [c["check"] for c in json.loads(out.read_text())["acceptance"]]
    assert any(c.startswith("ragrt fp32 (tiny), drafts: decode batch 1 >= onnxruntime-genai int4") for c in checks)
