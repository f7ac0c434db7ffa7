"""`ragrt export --ray`: chunking and embedding on a Ray cluster give the local export's passages,
vectors and answers, on one node and across two; without Ray the plain export still works and
`--ray` says what to install."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ragrt import Engine
from ragrt.corpus.documents import chunk_documents, read_documents
from ragrt.retrieval.encoder import TextEncoder

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")

QUESTIONS = ("How do I copy a list?", "parse JSON", "the GIL and threads", "close a file", "lazy values",
             "mutable sequences", "with statement")
# Small windows, so the tiny corpus makes enough passages for several actor calls.
SMALL = {"max_tokens": 8, "overlap": 2}


@pytest.fixture(scope="module")
def encoder_files(tiny_bundle, tiny_encoder_dir) -> dict:
    """The fp32 graph the export embeds passages with, its tokenizer and dims."""
    from ragrt.export.pipeline import encoder_graphs
    meta = json.loads((encoder_graphs(tiny_encoder_dir) / "meta.json").read_text())
    return {"model": encoder_graphs(tiny_encoder_dir) / "fp32" / "model.onnx",
            "tokenizer": tiny_bundle / "encoder" / "tokenizer.json", "max_length": meta["max_length"], "dim": meta["dim"]}


def local_embedding(corpus: Path, files: dict, *, max_tokens: int, overlap: int):
    """The local export's chunking and embedding (export/pipeline.py without --ray)."""
    from tokenizers import Tokenizer

    from ragrt.export.index import embed_passages
    tok = Tokenizer.from_file(str(files["tokenizer"]))
    passages = list(chunk_documents(list(read_documents(corpus)), tok, max_tokens=max_tokens, overlap=overlap))
    encoder = TextEncoder(files["model"], files["tokenizer"], max_length=files["max_length"], dim=files["dim"])
    return passages, embed_passages(passages, encoder, progress=False)


def assert_same_embedding(on_ray, local) -> None:
    passages, vectors = local
    assert [(p.id, p.title, p.text) for p in on_ray.passages] == [(p.id, p.title, p.text) for p in passages]
    assert on_ray.vectors.shape == vectors.shape
    np.testing.assert_allclose(on_ray.vectors, vectors, atol=1e-5, rtol=0)


@pytest.fixture
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_ray_export_equals_local_export(local_cluster, tiny_bundle, tiny_corpus, tiny_encoder_dir,
                                        tiny_generator_dir, tmp_path):
    from ragrt.export.pipeline import ExportConfig, run_export
    out = run_export(ExportConfig(corpus=tiny_corpus, out=tmp_path / "ray", encoder=tiny_encoder_dir,
                                  generator=tiny_generator_dir, quantize="fp32", parity_prompts=3, max_context=512,
                                  ray="local"))
    local, on_ray = Engine.open(tiny_bundle, threads=1), Engine.open(out, threads=1)
    a, b = local.corpus.get().store, on_ray.corpus.get().store
    assert len(a) == len(b) == 5
    assert [(a.get(r).id, a.get(r).text) for r in range(len(a))] == [(b.get(r).id, b.get(r).text) for r in range(len(b))]
    for q in QUESTIONS:
        x, y = local.retrieve(q, k=10), on_ray.retrieve(q, k=10)
        assert [(h.id, h.row) for h in x] == [(h.id, h.row) for h in y], q
    assert on_ray.bundle.manifest.corpus.documents == 5


def test_ray_embedding_of_jsonl_and_parquet_equals_local(local_cluster, tiny_corpus, encoder_files, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ragrt.export.ray_embed import RayEmbedding, embed_on_ray, read_corpus
    local = local_embedding(tiny_corpus, encoder_files, **SMALL)
    assert len(local[0]) > 10
    rows = [json.loads(line) for line in tiny_corpus.read_text().splitlines()]
    parquet = tmp_path / "corpus.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet, row_group_size=2)
    for corpus in (tiny_corpus, parquet):
        docs, count = read_corpus(corpus)
        assert count == 5 and isinstance(docs, Path) == (corpus == parquet)
        on_ray = embed_on_ray(docs, RayEmbedding(actors=2, batch_rows=4), **encoder_files, **SMALL, progress=False)
        assert_same_embedding(on_ray, local)


def test_a_parquet_corpus_without_text_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ragrt.errors import CorpusError
    from ragrt.export.ray_embed import read_corpus
    pq.write_table(pa.Table.from_pylist([{"id": "a", "body": "x"}]), tmp_path / "c.parquet")
    with pytest.raises(CorpusError, match="needs columns id, text.*missing text"):
        read_corpus(tmp_path / "c.parquet")


@pytest.fixture
def two_nodes():
    """Two nodes of one CPU each: an actor of one CPU per node, so a pool of two spans both."""
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_embedding_spans_two_nodes_and_equals_local(two_nodes, tiny_corpus, encoder_files):
    from ragrt.export.ray_embed import RayEmbedding, embed_on_ray
    on_ray = embed_on_ray(list(read_documents(tiny_corpus)), RayEmbedding(address=two_nodes.address, batch_rows=2),
                          **encoder_files, **SMALL, progress=False)
    assert on_ray.actors == 2
    assert sorted(on_ray.nodes) == sorted(n.node_id for n in two_nodes.list_all_nodes())
    assert sum(on_ray.nodes.values()) == len(on_ray.passages)
    # The pool's first round is one batch per actor: 2 passages each here.
    assert 0 < on_ray.first_round_rows <= 4 and 0 < on_ray.first_round_s <= on_ray.seconds and on_ray.steady_rate > 0
    assert_same_embedding(on_ray, local_embedding(tiny_corpus, encoder_files, **SMALL))
    assert not ray.is_initialized()           # it opened the connection, so it closed it


# Python without Ray: an import of it fails as when it is not installed.
NO_RAY = ("import sys\nclass NoRay:\n    def find_spec(self, name, path=None, target=None):\n"
          "        if name.split('.')[0] == 'ray':\n            raise ModuleNotFoundError(name=name)\n"
          "sys.meta_path.insert(0, NoRay())\nfrom ragrt.cli import main\nsys.exit(main(sys.argv[1:]))\n")


def test_without_ray_the_plain_export_works_and_ray_says_what_to_install(tiny_corpus, tiny_encoder_dir,
                                                                        tiny_generator_dir, tmp_path):
    args = ["export", "--corpus", str(tiny_corpus), "--encoder", str(tiny_encoder_dir), "--generator",
            str(tiny_generator_dir), "--quantize", "fp32", "--parity-prompts", "3", "--max-context", "512"]
    refused = subprocess.run([sys.executable, "-c", NO_RAY, *args, "--out", str(tmp_path / "r"), "--ray"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and not (tmp_path / "r").exists()
    assert len(refused.stderr.strip().splitlines()) == 1 and "pip install 'ragrt[ray]'" in refused.stderr
    plain = subprocess.run([sys.executable, "-c", NO_RAY, *args, "--out", str(tmp_path / "p")],
                           capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0, plain.stderr[-2000:]
    assert len(Engine.open(tmp_path / "p").retrieve("parse JSON", k=10)) == 5


def test_passage_kv_on_ray_equals_local(local_cluster, tiny_bundle, tmp_path):
    """`--ray --passage-kv all`: blocks computed by an actor pool are the local export's, in its order."""
    from ragrt.bundle.reader import Bundle
    from ragrt.decoding.blockstore import BlockStore, graph_id, write_store
    from ragrt.export.ray_passage_kv import RayBlocks, blocks_on_ray
    from ragrt.retrieval.passages import PassageStore
    bundle = Bundle.open(tiny_bundle)
    m, gen = bundle.manifest, bundle.generation
    store = PassageStore.open(gen.path, gen.spec.passages)
    passages = [store.get(i) for i in range(len(store))]
    (tmp_path / "local").mkdir()
    (tmp_path / "ray").mkdir()
    local = write_store(tiny_bundle, m, tmp_path / "local", passages)
    compute = blocks_on_ray(RayBlocks(actors=2, batch_blocks=2), root=tiny_bundle, spec=m.generator,
                            graph_id=graph_id(m))
    on_ray = write_store(tiny_bundle, m, tmp_path / "ray", passages, compute=compute)
    assert on_ray == local and local.computed == local.blocks > 2
    a, b = BlockStore.open(tmp_path / "local"), BlockStore.open(tmp_path / "ray")
    assert a.keys() == b.keys() and (a.graph_id, a.prefix) == (b.graph_id, b.prefix)
    for key in a.keys():
        np.testing.assert_allclose(b.stored(key).astype(np.float32), a.stored(key).astype(np.float32),
                                   atol=2e-3, rtol=1e-3)
