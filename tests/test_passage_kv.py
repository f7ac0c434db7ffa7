"""Passage KV on the tiny llama's fused graph: blocks computed once, assembled with turned keys."""
from dataclasses import replace

import numpy as np
import pytest

from ragrt.decoding.blocks import BlockCache, BlockPrompt, BlockStats, PassageKV, rotate_keys
from ragrt.decoding.generator import open_decoder
from ragrt.runtime.sessions import SessionConfig, create_session

pytest.importorskip("onnxruntime_genai")


@pytest.fixture(scope="module")
def decoder(tiny_fused_fp32, tiny_generator_dir):
    from ragrt.export.onnx.graphs import graph_rotary
    path, spec = tiny_fused_fp32
    rotary, why_not = graph_rotary(tiny_generator_dir, path)
    assert why_not == "" and rotary == {"rotary_base": 10000.0, "rotary_dim": 16, "rotary_interleaved": False,
                                        "rotary_inv_freq": (), "local_rotary_layers": (), "rotary_local_base": 0.0}
    return open_decoder(create_session(path, SessionConfig(threads=1)), replace(spec, **rotary))


@pytest.fixture(scope="module")
def assembling(decoder, tiny_fused_fp32, tmp_path_factory):
    """The same graph with its assembly graph (export/onnx/assemble_graph.py), over shared weights."""
    import shutil

    from ragrt.export.onnx.assemble_graph import write_assemble_graph
    root = tmp_path_factory.mktemp("assemble")
    shutil.copy(tiny_fused_fp32[0], root / "model.onnx")
    assert write_assemble_graph(root / "model.onnx", root / "model.onnx.data", root / "assemble.onnx") == \
        decoder.spec.num_layers
    return open_decoder(create_session(root / "model.onnx", SessionConfig(threads=1)), decoder.spec,
                        assemble_session=create_session(root / "assemble.onnx", SessionConfig(threads=1)))


def test_sliding_window_attention_gets_no_assembly_graph(tiny_fused_fp32, tmp_path):
    """A window counted from each token's place in the cache would be wrong for tokens run out of place."""
    import onnx

    from ragrt.export.onnx.assemble_graph import write_assemble_graph
    model = onnx.load(str(tiny_fused_fp32[0]))
    for node in model.graph.node:
        for a in node.attribute:
            if node.op_type == "GroupQueryAttention" and a.name == "local_window_size":
                a.i = 8
    onnx.save(model, str(tmp_path / "model.onnx"))
    assert write_assemble_graph(tmp_path / "model.onnx", tmp_path / "model.onnx.data", tmp_path / "assemble.onnx") == 0
    assert not (tmp_path / "assemble.onnx").exists() and not (tmp_path / "model.onnx.data").exists()


@pytest.fixture(params=["run by block", "assembly graph"])
def repairing(request, decoder, assembling):
    """The repair both ways the engine runs it: a run per block, or one run with the tail."""
    return decoder if request.param == "run by block" else assembling


def _prompt(rng, vocab, prefix=7, blocks=(9, 14, 5), tail=6) -> BlockPrompt:
    ids = lambda n: tuple(int(t) for t in rng.integers(3, vocab, n))
    return BlockPrompt(ids(prefix), tuple(ids(n) for n in blocks), ids(tail))


def test_rotation_composes_and_inverts(decoder):
    spec = decoder.spec
    k = np.random.default_rng(0).standard_normal((2, 5, spec.head_dim)).astype(np.float64)
    np.testing.assert_allclose(rotate_keys(rotate_keys(k, 3, spec), 4, spec), rotate_keys(k, 7, spec), atol=1e-12)
    np.testing.assert_allclose(rotate_keys(rotate_keys(k, 11, spec), -11, spec), k, atol=1e-12)
    # A rotation keeps each key's length.
    np.testing.assert_allclose(np.linalg.norm(rotate_keys(k, 9, spec), axis=-1), np.linalg.norm(k, axis=-1))


def test_one_block_is_full_prefill(decoder):
    """With one passage, block attention is plain causal attention: same logits as full prefill."""
    p = _prompt(np.random.default_rng(1), decoder.spec.vocab_size, blocks=(12,))
    kv = PassageKV(decoder, "g", dtype=np.float32)
    got, _ = kv.prefill([p])
    want, _ = decoder.prefill([p.ids])
    np.testing.assert_allclose(got, want, atol=2e-4)


def test_assembly_equals_pytorch_block_reference(decoder, tiny_generator_dir):
    """Several blocks against PyTorch in float64, as fine-tuning reads them (sft.block_logits):
    each block run after the prefix at positions starting right after it, its keys turned by HF's
    own rotary to their place in the prompt, then the tail run over the assembled cache at
    contiguous positions. So the generator trains on the very prompt the engine assembles."""
    import torch
    from transformers import LlamaForCausalLM

    from ragrt.export.train.sft import block_logits
    p = _prompt(np.random.default_rng(2), decoder.spec.vocab_size)
    model = LlamaForCausalLM.from_pretrained(tiny_generator_dir, torch_dtype=torch.float64).eval()
    with torch.no_grad():
        ref = block_logits(model, p, [])[-1].numpy()
    got, state = PassageKV(decoder, "g", dtype=np.float32).prefill([p])
    np.testing.assert_allclose(got[0], ref, atol=5e-4)
    assert state.lengths.tolist() == [len(p.ids)]
    # Blocks attend only to themselves and the prefix, so this is not full attention's answer.
    full, _ = decoder.prefill([p.ids])
    assert np.abs(full[0] - ref).max() > 1e-3


@pytest.mark.parametrize("repair", [3, 6])
def test_repair_equals_pytorch_reference(repairing, tiny_generator_dir, repair):
    """The first `repair` tokens of each later block run again over the cache before them, as
    fine-tuning computes it; more tokens repaired bring block mode nearer full prefill."""
    import torch
    from transformers import LlamaForCausalLM

    from ragrt.export.train.sft import block_logits
    p = _prompt(np.random.default_rng(2), repairing.spec.vocab_size)
    model = LlamaForCausalLM.from_pretrained(tiny_generator_dir, torch_dtype=torch.float64).eval()
    with torch.no_grad():
        ref = block_logits(model, p, [], repair=repair)[-1].numpy()
        plain = block_logits(model, p, [])[-1].numpy()
    stats = BlockStats()
    got, state = PassageKV(repairing, "g", dtype=np.float32, repair=repair).prefill([p], stats)
    np.testing.assert_allclose(got[0], ref, atol=5e-4)
    assert state.lengths.tolist() == [len(p.ids)]
    assert np.abs(plain - ref).max() > 1e-3
    assert stats.repair_ms > 0


def test_repairing_whole_blocks_is_full_prefill(decoder, repairing):
    """Every block run again over the cache before it is exactly what full prefill computes: the
    logits, and the cache the answer's tokens then read (the assembly graph's run has moved each
    repaired token over its copy, and the tail after the blocks)."""
    rng = np.random.default_rng(9)
    p = _prompt(rng, decoder.spec.vocab_size)
    kv = PassageKV(repairing, "g", dtype=np.float32, repair=max(map(len, p.blocks)))
    got, state = kv.prefill([p])
    want, full = decoder.prefill([p.ids])
    np.testing.assert_allclose(got, want, atol=2e-4)
    n = len(p.ids)
    for a, b in zip(state.buffers.arrays, full.buffers.arrays):
        np.testing.assert_allclose(a[0, :, :n], b[0, :, :n], atol=2e-4)


def test_a_batch_mixes_block_and_plain_prompts(decoder):
    rng = np.random.default_rng(5)
    a, plain = _prompt(rng, decoder.spec.vocab_size), _prompt(rng, decoder.spec.vocab_size).ids
    kv = PassageKV(decoder, "g", dtype=np.float32)
    logits, state = kv.prefill([a, plain])
    np.testing.assert_allclose(logits[0], kv.prefill([a])[0][0], atol=1e-5)
    np.testing.assert_allclose(logits[1], decoder.prefill([plain])[0][0], atol=1e-5)
    assert state.lengths.tolist() == [len(a.ids), len(plain)]


def test_blocks_kept_in_float16_stay_near_float32(decoder):
    p = _prompt(np.random.default_rng(6), decoder.spec.vocab_size)
    exact, _ = PassageKV(decoder, "g", dtype=np.float32).prefill([p])
    half, _ = PassageKV(decoder, "g").prefill([p])
    assert np.abs(half - exact).max() <= 2e-3 * np.abs(exact).max()


def test_reused_blocks_give_the_same_logits(decoder):
    rng = np.random.default_rng(3)
    a = _prompt(rng, decoder.spec.vocab_size)
    # The same passages in another order, after another question: every block is reused.
    b = BlockPrompt(a.prefix, a.blocks[::-1], tuple(int(t) for t in rng.integers(3, decoder.spec.vocab_size, 4)))
    kv = PassageKV(decoder, "g", dtype=np.float32)
    first = BlockStats()
    kv.prefill([a], first)
    assert (first.reused, first.computed) == (0, 3)
    warm, again = kv.prefill([b], BlockStats()), BlockStats()
    cold = PassageKV(decoder, "g", dtype=np.float32).prefill([b])
    kv.prefill([b], again)
    assert (again.reused, again.computed) == (3, 0)
    np.testing.assert_array_equal(warm[0], cold[0])


def test_prefill_cost_counts_what_the_graph_will_run(decoder):
    """A scheduler budgets a block prompt by the tokens its prefill runs: the whole prompt before
    anything is computed; then the tail, the repairs and only the blocks not yet kept."""
    rng = np.random.default_rng(4)
    a = _prompt(rng, decoder.spec.vocab_size, blocks=(9, 14, 5))
    kv = PassageKV(decoder, "g", dtype=np.float32, repair=6)
    assert kv.prefill_cost(a) == len(a.ids)
    kv.prefill([a])
    hits = kv.cache.hits
    assert kv.prefill_cost(a) == len(a.tail) + 6 + 5
    assert kv.cache.hits == hits                     # a look, not a use: the queue order is kept
    new_block = tuple(int(t) for t in rng.integers(3, decoder.spec.vocab_size, 11))
    b = BlockPrompt(a.prefix, (a.blocks[0], new_block), a.tail)
    assert kv.prefill_cost(b) == len(a.tail) + 6 + 11


def test_keys_hold_graph_prefix_and_content(decoder):
    p = _prompt(np.random.default_rng(4), decoder.spec.vocab_size)
    kv = PassageKV(decoder, "graph-a")
    block = p.blocks[0]
    assert kv.key(p.prefix, block) == PassageKV(decoder, "graph-a").key(p.prefix, block)
    assert kv.key(p.prefix, block) != PassageKV(decoder, "graph-b").key(p.prefix, block)
    assert kv.key(p.prefix, block) != kv.key(p.prefix[1:], block)
    assert kv.key(p.prefix, block) != kv.key(p.prefix, block[:-1])


def test_cache_evicts_least_recent_within_budget():
    cache = BlockCache(budget_bytes=3 * 800)
    blocks = {bytes([i]): np.zeros(100, dtype=np.float64) for i in range(4)}   # 800 bytes each
    for key in list(blocks)[:3]:
        cache.put(key, blocks[key])
    assert cache.get(bytes([0])) is not None       # 0 is now the most recent
    cache.put(bytes([3]), blocks[bytes([3])])
    assert cache.get(bytes([1])) is None and cache.get(bytes([0])) is not None
    assert cache.bytes <= cache.budget and len(cache) == 3 and cache.evictions == 1
