"""benchmarks/run.py end to end on the tiny bundle with tiny sizes: the JSON's shape and the acceptance checks."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_quick_suite_writes_json_markdown_plots_and_checks(tiny_bundle, tiny_encoder_dir, tmp_path, monkeypatch):
    pytest.importorskip("faiss")
    pytest.importorskip("matplotlib")
    pytest.importorskip("sentence_transformers")
    monkeypatch.setenv("RAGRT_BENCH_CACHE", str(tmp_path / "cache"))
    import common
    monkeypatch.setattr(common, "CACHE", tmp_path / "cache")
    import retrieval
    monkeypatch.setattr(retrieval, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(retrieval, "SWEEP", (16, 64))
    import run
    out = tmp_path / "suite"
    assert run.main(["--bundle", str(tiny_bundle), "--out", str(out), "--quick", "--skip", "limits,generation", "--encode-seconds", "0.2",
                     "--sizes", "1500", "--queries", "20", "--base", "5", "--texts", "8", "--clients", "1,2",
                     "--duration", "1", "--max-new-tokens", "4", "--st-model", str(tiny_encoder_dir)]) == 0

    res = json.loads(out.with_name("suite.json").read_text())
    assert "generation" not in res and "limits" not in res
    enc = res["encoding"]
    assert set(enc["engines"]) == {"ragrt fp32 (onnxruntime)", "sentence-transformers fp32 (PyTorch)"}
    assert all(v > 0 for v in enc["ratios"].values())
    assert enc["cosine_mean"] > 0.9              # the same tiny encoder in onnxruntime and in PyTorch
    (size,) = res["retrieval"]["sizes"]
    assert size["n"] == 1500 and set(size["engines"]) == {"numpy exact", "usearch view", "faiss HNSW"}
    assert size["engines"]["numpy exact"]["recall_at_10"] == 1.0
    for name in ("usearch view", "faiss HNSW"):
        r = size["engines"][name]
        assert 0 <= r["recall_at_10"] <= 1 and r["qps_batch1"] > 0 and r["file_mib"] > 0
        assert [s["expansion_search"] for s in r["sweep"]] == [16, 64, 128]
        assert r["memory"]["rss_mib"] >= r["memory_before_load"]["rss_mib"] > 0
    assert [lv["clients"] for lv in res["ask"]["levels"]] == [1, 2]
    assert all(lv["errors"] == 0 and lv["answers"] > 0 and lv["p50_ms"] <= lv["p99_ms"] for lv in res["ask"]["levels"])

    checks = {c["check"]: c for c in res["checks"]}
    assert len(checks) == 4
    enc_check = next(c for name, c in checks.items() if name.startswith("encoder"))
    assert enc_check["passed"] is False          # an fp32 encoder never passes the int8 criterion
    for c in checks.values():
        assert isinstance(c["passed"], bool) and c["value"] is not None
    assert not next(c for n, c in checks.items() if n.startswith("usearch recall"))["passed"]  # 1,500 < 1M

    md = out.with_name("suite.md").read_text()
    assert "## Acceptance checks" in md and "**FAIL**" in md
    for name in ("encoding", "retrieval", "ask"):
        assert out.with_name(f"suite-{name}.png").stat().st_size > 0


def test_checks_are_computed_from_the_numbers():
    import run
    usearch = {"recall_at_10": 0.975, "expansion_search": 128, "file_mib": 1000.0,
               "memory": {"rss_mib": 300.0}, "memory_before_load": {"rss_mib": 100.0},
               "sweep": [{"expansion_search": 64, "recall_at_10": 0.95}, {"expansion_search": 128, "recall_at_10": 0.975}]}
    res = {"encoding": {"ratios": {"batch1_passages_per_s": 3.5, "batch1_questions_per_s": 3.1,
                                   "batch32_passages_per_s": 2.0}, "encoder": {"quantization": "int8"}},
           "retrieval": {"queries": 1000, "sizes": [{"n": 1_000_000, "engines": {"usearch view": usearch}}]}}
    usearch["memory"]["rss_anon_mib"], usearch["memory_before_load"]["rss_anon_mib"] = 60.0, 20.0
    usearch["memory_after_load"] = {"rss_mib": 150.0}
    assert [c["passed"] for c in run.checks(res)] == [True, True, True, True]
    res["encoding"]["ratios"]["batch1_questions_per_s"] = 2.9
    usearch["memory"]["rss_mib"] = 700.0
    usearch["recall_at_10"] = 0.96
    assert [c["passed"] for c in run.checks(res)] == [False, False, False, True]
    usearch["memory"]["rss_anon_mib"] = 620.0
    assert [c["passed"] for c in run.checks(res)] == [False, False, False, False]
    assert [c["passed"] for c in run.checks({"ask": {"error": "x"}})] == [None] * 4


def test_limits_arithmetic():
    import limits
    p = limits.parameters()
    assert round(p["total"] / 1e6, 1) == 134.5              # SmolLM2-135M
    r = limits.limits(bw_gb_s=10.0, cores=2, ghz=2.5, prompt_tokens=100)
    assert r["peak_gflop_s_fp32"] == 2 * 2 * 8 * 2 * 2.5
    assert r["decode"]["fp32"]["ceiling_tok_s"] == pytest.approx(10e9 / (4 * p["read_per_token"]))
    assert r["decode"]["int4"]["ceiling_tok_s"] > r["decode"]["int8"]["ceiling_tok_s"] > r["decode"]["fp32"]["ceiling_tok_s"]
    assert r["ttft_floor_ms_fp32"] == pytest.approx(r["prefill_gflop"] / r["peak_gflop_s_fp32"] * 1e3)


def test_step_profile_splits_kernel_time_by_operator(tiny_bundle):
    from ragrt.bundle.manifest import read_manifest
    from step_profile import profile
    spec = read_manifest(tiny_bundle).generator
    r = profile(tiny_bundle, spec, context=12, steps=3, threads=1)
    assert r["step_ms"] > 0 and r["context"] == 12
    assert sum(r["kernel_share"].values()) == pytest.approx(1.0)
    assert "MatMul" in "".join(r["kernel_share"])       # the graph's projections were profiled
    prefill = profile(tiny_bundle, spec, context=12, steps=2, threads=1, prefill=True)
    assert prefill["step_ms"] > 0 and sum(prefill["kernel_share"].values()) == pytest.approx(1.0)


def test_fidelity_scores_graphs_against_a_reference(tiny_bundle, tmp_path, capsys):
    """A graph against itself: KL 0 and every top token the same; a copy with one weight
    scaled is measurably further away. Bad QA lines name their line."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from ragrt.bundle.manifest import read_manifest
    from fidelity import main
    qa = tmp_path / "qa.jsonl"
    qa.write_text('{"question": "How do I copy a list?", "answer": "Use list.copy() or a[:]."}\n'
                  '{"question": "What is a tuple?", "answer": "An immutable sequence."}\n')
    own = tiny_bundle / read_manifest(tiny_bundle).generator.model
    model = onnx.load(str(own))
    weight = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 1000)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    onnx.save(model, str(tmp_path / "perturbed.onnx"))
    out = tmp_path / "fidelity.json"
    main(["--bundle", str(tiny_bundle), "--qa", str(qa), "--reference", f"fp32={own}", "--graph", f"same={own}",
          "--graph", f"perturbed={tmp_path / 'perturbed.onnx'}", "--answer-tokens", "8", "--threads", "1",
          "--json", str(out)])
    r = json.loads(out.read_text())
    assert r["questions"] == 2 and 2 <= r["answer_tokens"] <= 16
    assert r["graphs"]["same"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-9)
    assert r["graphs"]["same"]["top1_as_reference"] == 1.0 and r["graphs"]["same"]["answer_nll"] > 0
    assert r["graphs"]["perturbed"]["kl_to_reference"] > 1e-4
    assert "2 questions" in capsys.readouterr().out
    qa.write_text('{"question": "How?"}\n')
    with pytest.raises(SystemExit, match=r"qa.jsonl:1: needs string fields"):
        main(["--bundle", str(tiny_bundle), "--qa", str(qa), "--reference", f"fp32={own}", "--graph", f"same={own}"])
