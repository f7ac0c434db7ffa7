"""Export mechanics on tiny random models: the ONNX graphs compute what PyTorch computes, the
`num_logits` rewrite, int8 quantization really happening, checkpoint checks, and the model cache."""
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from ragrt.errors import RagrtError, UserInputError
from ragrt.bundle.manifest import GeneratorIO
from ragrt.export.cache import cached_dir, content_key
from ragrt.export.models import encoder_checkpoint, generator_checkpoint
from ragrt.export.onnx.graphs import export_encoder
from ragrt.export.quant.quantize import op_counts, quantize_encoder, quantize_encoder_w8a8, quantize_generator

IO = GeneratorIO()


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# --- encoder ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder_export(tiny_encoder_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("enc")
    exp = export_encoder(tiny_encoder_dir, out / "fp32", max_length=64)
    report = quantize_encoder(exp.model, out / "int8" / "model.onnx")
    return exp, report, out / "int8" / "model.onnx"


def test_w8a8_encoder_quantizes_weights_and_activations_and_stays_close(encoder_export, tmp_path):
    exp, _, _ = encoder_export
    report = quantize_encoder_w8a8(exp.model, tmp_path / "model.onnx")
    assert report.quantized_ops["MatMulInteger"] > 0 and report.quantized_ops["DynamicQuantizeLinear"] > 0
    assert report.matmul_after > 0                     # attention's activation x activation MatMuls stay fp32
    ids, mask = padded_batch(exp.tokenizer, ENCODER_TEXTS)
    feeds = {"input_ids": ids, "attention_mask": mask}
    (ref,) = session(exp.model).run(["embedding"], feeds)
    (got,) = session(tmp_path / "model.onnx").run(["embedding"], feeds)
    assert (ref * got).sum(1).min() > 0.95


def padded_batch(tokenizer_path, texts):
    from tokenizers import Tokenizer
    encs = Tokenizer.from_file(str(tokenizer_path)).encode_batch(texts)
    width = max(len(e.ids) for e in encs)
    ids = np.array([e.ids + [0] * (width - len(e.ids)) for e in encs], dtype=np.int64)
    mask = np.array([[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in encs], dtype=np.int64)
    return ids, mask


ENCODER_TEXTS = ["lists are mutable", "the json module parses json documents and open returns a file object", "gil"]


def torch_pooled(checkpoint, ids, mask):
    import torch
    from transformers import AutoModel
    model = AutoModel.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        h = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
        m = torch.tensor(mask).unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()


def test_encoder_onnx_equals_pytorch_on_a_padded_batch(encoder_export, tiny_encoder_dir):
    exp, _, _ = encoder_export
    ids, mask = padded_batch(exp.tokenizer, ENCODER_TEXTS)
    assert (mask == 0).any(), "the batch must include padding"
    (emb,) = session(exp.model).run(["embedding"], {"input_ids": ids, "attention_mask": mask})
    assert emb.shape == (3, exp.dim) == (3, 32)
    np.testing.assert_allclose(emb, torch_pooled(tiny_encoder_dir, ids, mask), atol=1e-5)


def test_encoder_tokenizer_truncates_and_leaves_padding_to_the_engine(encoder_export):
    exp, _, _ = encoder_export
    spec = json.loads(exp.tokenizer.read_text())
    assert spec["padding"] is None
    assert spec["truncation"]["max_length"] == exp.max_length == 64


def test_int8_encoder_is_quantized_and_close(encoder_export):
    exp, report, int8 = encoder_export
    assert report.quantized_ops.get("MatMulNBits", 0) > 0 and report.bytes_after < report.bytes_before
    ids, mask = padded_batch(exp.tokenizer, ENCODER_TEXTS)
    feeds = {"input_ids": ids, "attention_mask": mask}
    (ref,) = session(exp.model).run(["embedding"], feeds)
    (got,) = session(int8).run(["embedding"], feeds)
    assert (ref * got).sum(1).min() > 0.95


# --- generator -------------------------------------------------------------------------------

def run_generator(sess, exp, ids, mask, position_ids, num_logits, past=None):
    """logits and the presents, as a list of (key, value) per layer."""
    batch = ids.shape[0]
    feeds = {IO.input_ids: ids, IO.attention_mask: mask, IO.position_ids: position_ids,
             IO.num_logits: np.array([num_logits], dtype=np.int64)}
    empty = np.zeros((batch, exp.num_kv_heads, 0, exp.head_dim), dtype=np.float32)
    for layer in range(exp.num_layers):
        k, v = past[layer] if past else (empty, empty)
        feeds[IO.past_key.format(layer=layer)] = k
        feeds[IO.past_value.format(layer=layer)] = v
    names = [IO.logits] + [n.format(layer=i) for i in range(exp.num_layers) for n in (IO.present_key, IO.present_value)]
    logits, *kv = sess.run(names, feeds)
    return logits, list(zip(kv[0::2], kv[1::2]))


@pytest.fixture(scope="module")
def generator(tiny_generator_onnx, tiny_generator_dir):
    import torch
    from transformers import AutoModelForCausalLM
    out, exp = tiny_generator_onnx
    torch_model = AutoModelForCausalLM.from_pretrained(tiny_generator_dir, dtype=torch.float32).eval()
    return session(exp.model), exp, torch_model


@pytest.fixture(scope="module")
def left_padded():
    """Two prompts, the shorter one left-padded, with the positions a left-padded batch needs."""
    rows = [[5, 17, 40, 99, 3], [8, 12, 60, 61, 62, 70, 71, 200]]
    width = max(map(len, rows))
    ids = np.array([[0] * (width - len(r)) + r for r in rows], dtype=np.int64)
    mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=np.int64)
    return ids, mask, np.clip(mask.cumsum(1) - 1, 0, None)


def torch_logits(torch_model, ids, mask, position_ids):
    import torch
    with torch.no_grad():
        return torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                           position_ids=torch.tensor(position_ids)).logits.numpy()


def test_generator_graph_names_and_metadata(generator, tiny_generator_dir):
    from tiny import CHAT_TEMPLATE
    from transformers import AutoTokenizer
    sess, exp, _ = generator
    names = {i.name for i in sess.get_inputs()} | {o.name for o in sess.get_outputs()}
    for layer in range(exp.num_layers):
        assert {n.format(layer=layer) for n in (IO.past_key, IO.past_value, IO.present_key, IO.present_value)} <= names
    assert {IO.input_ids, IO.attention_mask, IO.position_ids, IO.num_logits, IO.logits} <= names
    im_end = AutoTokenizer.from_pretrained(tiny_generator_dir).convert_tokens_to_ids("<|im_end|>")
    assert (exp.num_layers, exp.num_kv_heads, exp.head_dim, exp.max_position_embeddings) == (2, 2, 16, 512)
    assert exp.eos_token_ids == (im_end,) and exp.pad_token_id == im_end
    assert exp.chat_template == CHAT_TEMPLATE and exp.bos_token is None
    assert exp.tokenizer.is_file() and exp.vocab_size == len(AutoTokenizer.from_pretrained(tiny_generator_dir))


def test_the_chat_templates_end_of_turn_token_stops_generation(tiny_generator_dir, tmp_path):
    """Gemma's template ends a turn with <end_of_turn>, which a base model's config does not name as EOS."""
    import shutil

    from transformers import AutoTokenizer

    from ragrt.export.onnx.graphs import describe_generator
    checkpoint = tmp_path / "hf"
    shutil.copytree(tiny_generator_dir, checkpoint)
    tok = AutoTokenizer.from_pretrained(checkpoint)
    tok.add_special_tokens({"additional_special_tokens": ["<end_of_turn>"]})
    tok.chat_template = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
                         "{% endfor %}<start_of_turn>model\n")
    tok.save_pretrained(checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    eos = tok.convert_tokens_to_ids("<|im_start|>")          # a config EOS other than ChatML's turn end
    (checkpoint / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    exp = describe_generator(checkpoint, tmp_path)
    # <|im_end|> is in the vocabulary still, but not in this template: the config's EOS and Gemma's turn end.
    assert exp.eos_token_ids == (eos, tok.convert_tokens_to_ids("<end_of_turn>"))


def test_last_logits_of_a_left_padded_batch_equal_pytorch(generator, left_padded):
    sess, exp, torch_model = generator
    ids, mask, pos = left_padded
    logits, _ = run_generator(sess, exp, ids, mask, pos, num_logits=1)
    assert logits.shape == (2, 1, exp.vocab_size)
    np.testing.assert_allclose(logits[:, 0], torch_logits(torch_model, ids, mask, pos)[:, -1], atol=1e-4)


def test_num_logits_covering_the_sequence_gives_every_position(generator, left_padded):
    sess, exp, torch_model = generator
    ids, mask, pos = left_padded
    ref = torch_logits(torch_model, ids, mask, pos)
    real = mask.astype(bool)           # a padded position's logits are meaningless in both
    for n in (ids.shape[1], ids.shape[1] + 5, 3):
        logits, _ = run_generator(sess, exp, ids, mask, pos, num_logits=n)
        width = min(n, ids.shape[1])
        assert logits.shape == (2, width, exp.vocab_size)
        np.testing.assert_allclose(logits[real[:, -width:]], ref[:, -width:][real[:, -width:]], atol=1e-4)


def test_a_step_with_past_equals_the_full_forward(generator, left_padded):
    sess, exp, torch_model = generator
    ids, mask, pos = left_padded
    _, past = run_generator(sess, exp, ids, mask, pos, num_logits=1)
    nxt = np.array([[33], [44]], dtype=np.int64)
    full_mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
    step, present = run_generator(sess, exp, nxt, full_mask, pos[:, -1:] + 1, num_logits=1, past=past)
    assert present[0][0].shape == (2, exp.num_kv_heads, ids.shape[1] + 1, exp.head_dim)
    full_ids = np.concatenate([ids, nxt], axis=1)
    ref = torch_logits(torch_model, full_ids, full_mask, np.clip(full_mask.cumsum(1) - 1, 0, None))
    np.testing.assert_allclose(step[:, 0], ref[:, -1], atol=1e-4)


def test_int8_generator_has_quantized_matmuls(generator, tmp_path):
    sess, exp, _ = generator
    report = quantize_generator(exp.model, tmp_path / "model.onnx")
    assert op_counts(tmp_path / "model.onnx")["MatMulNBits"] == report.quantized_ops["MatMulNBits"] > 0
    assert op_counts(tmp_path / "model.onnx")["DynamicQuantizeLinear"] == 0
    ids = np.array([[5, 17, 40]], dtype=np.int64)
    logits, _ = run_generator(session(tmp_path / "model.onnx"), exp, ids, np.ones_like(ids), np.arange(3)[None], 1)
    assert np.isfinite(logits).all()


def test_quantizing_a_graph_without_matmuls_is_an_error(tmp_path):
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    onnx.save(helper.make_model(graph), str(tmp_path / "relu.onnx"))
    with pytest.raises(RagrtError, match="no quantized MatMul"):
        quantize_generator(tmp_path / "relu.onnx", tmp_path / "q.onnx")


# --- checkpoints -----------------------------------------------------------------------------

def test_checkpoint_checks(tiny_encoder_dir, tiny_generator_dir, tmp_path):
    assert encoder_checkpoint(str(tiny_encoder_dir)) == tiny_encoder_dir
    assert generator_checkpoint(tiny_generator_dir) == tiny_generator_dir
    with pytest.raises(RagrtError, match="not supported for the encoder"):
        encoder_checkpoint(tiny_generator_dir)
    with pytest.raises(RagrtError, match="no such directory"):
        generator_checkpoint(tmp_path / "missing")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(RagrtError, match="no model weights"):
        generator_checkpoint(tmp_path)


def test_packaged_names_and_gguf_files(tiny_generator_dir, tmp_path, monkeypatch):
    import sys
    from ragrt.export import models
    with pytest.raises(RagrtError, match=r"'qwen-tiny' is neither a path nor a packaged generator "
                                         r"\(packaged: smollm2-135m, gemma3-270m\)"):
        generator_checkpoint("qwen-tiny")
    with pytest.raises(RagrtError, match="neither a path nor a packaged encoder"):
        encoder_checkpoint("bge-small")
    # A name whose package is not installed says what to install.
    for name, packaged in models.PACKAGED_GENERATORS.items():
        monkeypatch.setitem(sys.modules, packaged.module, None)       # find_spec then finds nothing
        with pytest.raises(RagrtError, match=f"the packaged model '{name}' is not installed: "
                                             f"{packaged.install}"):
            generator_checkpoint(name)
    with pytest.raises(RagrtError, match="no such GGUF file"):
        generator_checkpoint(tmp_path / "missing.gguf")
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf file")
    monkeypatch.setenv("RAGRT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RagrtError, match="transformers cannot read this GGUF file"):
        generator_checkpoint(tmp_path / "broken.gguf")
    assert not list((tmp_path / "cache" / "generator-hf").iterdir())     # nothing half-converted is kept


def test_a_sentencepiece_gguf_vocabulary_merges_by_score_as_llama_cpp(tmp_path):
    """A "llama" GGUF vocabulary tokenizes as llama.cpp's SentencePiece BPE: the pair forming the
    highest-scored normal token merges first, control and user-defined tokens match whole. A Unigram
    model over the same scores (transformers' reading of Gemma's) splits "▁the" into "▁t" "he"."""
    import gguf
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import Unigram
    from ragrt.export import models
    vocab = [("<unk>", 0.0, 2), ("<ctl>", 0.0, 3), ("\n\n", 0.0, 4),
             *[(c, -2.0, 1) for c in "▁theabc"], ("▁t", 0.0, 1), ("he", -1.0, 1), ("▁the", -3.0, 1),
             ("ab", -5.0, 1), ("bc", -4.0, 1)] + [(f"<0x{i:02X}>", 0.0, 6) for i in range(256)]
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([t for t, _, _ in vocab])
    writer.add_token_scores([s for _, s, _ in vocab])
    writer.add_token_types([k for _, _, k in vocab])
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    backend = Tokenizer(Unigram([(t, s) for t, s, _ in vocab], unk_id=0, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")          # the rest as transformers' GGUF reader sets it
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    assert backend.encode(" the").tokens == ["▁t", "he"]
    models._merge_by_score(backend, gguf.GGUFReader(path).fields)
    assert backend.encode(" the").tokens == ["▁the"]
    assert backend.encode("abc").tokens == ["a", "bc"]          # bc scores above ab, so it merges first
    assert backend.encode("ab\n\n<ctl>x").tokens == ["ab", "\n\n", "<ctl>", "<0x78>"]   # x: byte fallback
    assert backend.token_to_id("\n\n") == 2 and backend.token_to_id("<ctl>") == 1
    assert backend.decode(backend.encode(" the abc").ids) == " the abc"


# --- cache -----------------------------------------------------------------------------------

@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGRT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cached_dir_builds_once(cache):
    builds = []

    def build(tmp):
        builds.append(tmp)
        (tmp / "out.txt").write_text("built")

    first = cached_dir("thing", "k1", build)
    assert first == cache / "thing" / "k1" and (first / "out.txt").read_text() == "built"
    assert cached_dir("thing", "k1", build) == first and len(builds) == 1
    assert [p.name for p in (cache / "thing").iterdir()] == ["k1"]       # no temp dir left over


def test_a_failing_build_leaves_nothing(cache):
    def build(tmp):
        (tmp / "half.bin").write_bytes(b"x" * 100)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cached_dir("thing", "k2", build)
    assert list((cache / "thing").iterdir()) == []
    assert (cached_dir("thing", "k2", lambda tmp: (tmp / "ok").touch()) / "ok").is_file()


def test_a_killed_builds_dir_is_removed_and_a_running_ones_kept(cache):
    """SIGKILL skips the cleanup; the next build of the same entry deletes what is left."""
    import socket
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    host = socket.gethostname()
    parent = cache / "thing"
    killed = parent / f".k3.{host}-{dead}.abc"
    running = parent / f".k3.{host}-{os.getpid()}.def"
    elsewhere = parent / f".k3.otherhost-{dead}.ghi"
    for d in (killed, running, elsewhere):
        d.mkdir(parents=True)
        (d / "model.onnx").write_bytes(b"x")
    cached_dir("thing", "k3", lambda tmp: (tmp / "ok").touch())
    assert not killed.exists() and running.exists() and elsewhere.exists()


def test_a_new_recipes_entry_replaces_the_old_ones_of_its_lineage(cache):
    """An export-version bump makes new keys; the entries of the old keys are never read again."""
    def build(tmp):
        (tmp / "model.onnx").write_bytes(b"x")

    old = cached_dir("thing", "v1-of-a", build, lineage="a")
    other = cached_dir("thing", "v1-of-b", build, lineage="b")
    legacy = cache / "thing" / "from-before-lineages"          # complete, but no lineage recorded
    legacy.mkdir()
    (legacy / ".complete").touch()
    new = cached_dir("thing", "v2-of-a", build, lineage="a")
    assert (new / "model.onnx").is_file() and not old.exists()
    assert other.exists() and legacy.exists()
    assert cached_dir("thing", "v2-of-a", build, lineage="a") == new and new.exists()


def test_content_key_follows_bytes_and_names(cache, tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "a.bin").write_bytes(b"one")
    key = content_key(d, "v1")
    assert content_key(d, "v1") == key and content_key(d, "v2") != key and content_key(d / "a.bin") != key
    (d / "a.bin").write_bytes(b"two")
    changed = content_key(d, "v1")
    (d / "a.bin").rename(d / "b.bin")
    assert len({key, changed, content_key(d, "v1")}) == 3


def test_int4_generator_is_weight_only_and_batch_invariant(tiny_generator_onnx, tmp_path):
    """Batches run as batches only if a row's logits do not depend on its neighbours."""
    import numpy as np

    from ragrt.decoding.decoder import Decoder
    from ragrt.bundle.manifest import GeneratorSpec, ModelSource
    from ragrt.runtime.sessions import SessionConfig, create_session
    from ragrt.export.quant.quantize import op_counts, quantize_generator_int4

    out, exp = tiny_generator_onnx
    report = quantize_generator_int4(out / "model.onnx", tmp_path / "q.onnx")
    assert report.quantized_ops["MatMulNBits"] > 0
    assert op_counts(tmp_path / "q.onnx")["DynamicQuantizeLinear"] == 0
    spec = GeneratorSpec(model="", tokenizer="", quantization="int4", num_layers=exp.num_layers,
                         num_kv_heads=exp.num_kv_heads, head_dim=exp.head_dim, vocab_size=exp.vocab_size,
                         eos_token_ids=tuple(exp.eos_token_ids), pad_token_id=exp.pad_token_id, max_context=512,
                         source=ModelSource("tiny", ""))
    decoder = Decoder(create_session(tmp_path / "q.onnx", SessionConfig(threads=1)), spec)
    short, long = [5, 6, 7, 8], list(range(10, 40))
    batch, state = decoder.prefill([short, long])
    alone, alone_state = decoder.prefill([short])
    np.testing.assert_allclose(batch[0], alone[0], rtol=0, atol=1e-4)
    step, _ = decoder.step(state, np.array([9, 11]))
    alone_step, _ = decoder.step(alone_state, np.array([9]))
    # Float summation order may differ between batch shapes (1e-6 here); dynamic int8's shared
    # activation scale moved logits enough to flip greedy tokens.
    np.testing.assert_allclose(step[0], alone_step[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("encoder_quantize,shipped,op", [("int8", "int8", "MatMulNBits"),
                                                       ("w8a8", "w8a8", "MatMulInteger")])
def test_quantized_encoders_embed_queries_and_the_corpus_is_embedded_in_fp32(
        encoder_quantize, shipped, op, tiny_corpus, tiny_encoder_dir, tiny_generator_dir, tmp_path):
    """Only queries take the quantized encoder: the export embeds the corpus with the fp32 graph."""
    from ragrt import Engine
    from ragrt.retrieval.encoder import TextEncoder
    from ragrt.retrieval.passages import passage_text
    from ragrt.export.pipeline import ExportConfig, encoder_graphs, run_export
    bundle = run_export(ExportConfig(corpus=tiny_corpus, out=tmp_path / "b", encoder=tiny_encoder_dir,
                                     generator=tiny_generator_dir, quantize="int8", index_dtype="f32",
                                     encoder_quantize=encoder_quantize, parity_prompts=1, max_context=512))
    engine = Engine.open(bundle)
    assert engine.manifest.encoder.quantization == shipped and engine.manifest.corpus.embedded_with == "fp32"
    assert op_counts(bundle / engine.manifest.encoder.model)[op] > 0
    retriever = engine.retriever
    texts = [passage_text(retriever.store.get(i)) for i in range(len(retriever.store))]
    stored = np.asarray(retriever.index.get(np.arange(len(texts), dtype=np.uint64)), dtype=np.float32)
    spec = engine.manifest.encoder
    fp32 = TextEncoder(encoder_graphs(tiny_encoder_dir) / "fp32" / "model.onnx", bundle / spec.tokenizer,
                       max_length=spec.max_length, dim=spec.dim)
    assert np.abs(stored - fp32.embed_all(texts)).max() < 1e-5 < np.abs(stored - engine.embed(texts)).max()


def test_an_unknown_encoder_quantization_is_refused_before_any_model_work(tiny_corpus, tmp_path):
    from ragrt.export.pipeline import ExportConfig, run_export
    with pytest.raises(UserInputError, match="--encoder-quantize must be one of int8, w8a8, fp32, got 'int4'"):
        run_export(ExportConfig(corpus=tiny_corpus, out=tmp_path / "b", encoder_quantize="int4"))
    assert not (tmp_path / "b").exists()


def test_entries_of_one_recipe_stay_side_by_side_and_an_older_recipes_go(cache):
    """Each graph variant has its own entry of one lineage: building one must not delete another."""
    def build(tmp):
        (tmp / "model.onnx").write_bytes(b"x")

    old = cached_dir("thing", "v1-all", build, lineage="a")                    # one entry held every variant
    int8 = cached_dir("thing", "v2-int8", build, lineage="a", recipe="v2")
    assert not old.exists()
    fp32 = cached_dir("thing", "v2-fp32", build, lineage="a", recipe="v2")
    assert int8.exists() and fp32.exists()
    newer = cached_dir("thing", "v3-int8", build, lineage="a", recipe="v3")
    assert newer.exists() and not int8.exists() and not fp32.exists()


def test_graph_variants_of_one_checkpoint_keep_each_others_entries(cache, tiny_generator_dir):
    """int8 and int4 take different builder options, so different recipes: building one once deleted
    the other as superseded."""
    from ragrt.export.pipeline import generator_graph
    int8 = generator_graph(tiny_generator_dir, "int8", 1, "fused")
    int4 = generator_graph(tiny_generator_dir, "int4", 1, "fused")
    assert (int8 / "meta.json").exists() and (int4 / "meta.json").exists() and int8 != int4


def test_an_export_builds_only_the_graphs_its_bundle_ships(cache, tiny_corpus, tiny_encoder_dir, tiny_generator_dir,
                                                          tmp_path):
    from ragrt.export.pipeline import ExportConfig, run_export
    bundle = run_export(ExportConfig(corpus=tiny_corpus, out=tmp_path / "b", encoder=tiny_encoder_dir,
                                     generator=tiny_generator_dir, quantize="int8", graph="fused",
                                     parity_prompts=1, max_context=512))
    (entry,) = (cache / "generator-fused").iterdir()
    assert set(json.loads((entry / "meta.json").read_text())["parity"]) == {"int8"}
    assert not (cache / "encoder-w8a8").exists()
    parity = json.loads((bundle / "manifest.json").read_text())["parity"]
    assert set(parity["generator"]) == {"int8"} and parity["encoder"]["w8a8_cosine_mean"] is None
    assert parity["encoder"]["int8_cosine_mean"] > 0.9
    # By default questions take the graph that embedded the corpus.
    (encoders,) = (cache / "encoder-onnx").iterdir()
    assert json.loads((bundle / "manifest.json").read_text())["encoder"]["quantization"] == "fp32"
    assert (bundle / "encoder" / "model.onnx").read_bytes() == (encoders / "fp32" / "model.onnx").read_bytes()
