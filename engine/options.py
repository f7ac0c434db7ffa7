"""The choices and limits every surface accepts (Python API, CLI, HTTP schemas, export), defined once."""

MODES = ("concat", "token", "sequence", "extract")   # how passages become an answer: ragrt.decoding.rag
RETRIEVALS = ("dense", "bm25", "hybrid")          # how passages are found: ragrt.retrieval.retriever
MAX_K = 50                                        # passages per question
MAX_TURNS = 100                                   # earlier messages in a dialogue
PASSAGE_KV_MODES = ("auto", "on", "off")          # reuse passage KV: ragrt.decoding.blocks; auto = the bundle's default
PASSAGE_KV_CACHE_MB = 512                         # default byte budget of the passage KV kept at question time
# Tokens of each later passage block the export has the engine recompute over the assembled cache
# (rag.passage_kv_repair), and block training read prompts with: chosen on the FAQ dev split
# (benchmarks/README, "Repairing block assembly").
PASSAGE_KV_REPAIR = 16
HISTORY_IN_QUERY = 2                              # the user's latest turns that join the retrieval query

GENERATOR_QUANTIZATIONS = ("int8", "w8a8", "int4", "fp32", "fp16")
ENCODER_QUANTIZATIONS = ("int8", "w8a8", "fp32")
GRAPHS = ("fused", "optimum")
INDEX_DTYPES = ("f16", "i8", "f32")
DEVICES = ("auto", "cpu", "cuda")
