"""`ragrt export --dev`: the defaults the export measures on dev answers, on the tiny models."""
import json

from ragrt.export.pipeline import EXTRACT_WORDS


def test_dev_answers_choose_extract_where_it_beats_the_generator(tiny_corpus, tiny_encoder_dir, tiny_generator_dir,
                                                                tmp_path):
    from ragrt import Engine
    from ragrt.bundle.manifest import SCHEMA_VERSION
    from ragrt.export.pipeline import ExportConfig, run_export
    # The references are the passages' own sentences; a random-weight generator cannot say them.
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "How do I copy a list?", "answer": "Use list.copy() or a slice a[:] to copy a list.",
         "positive_ids": ["lists"]},
        {"question": "What does the GIL do?", "answer": "The GIL lets one thread run Python bytecode at a time.",
         "positive_ids": ["gil"]}]))
    bundle = run_export(ExportConfig(corpus=tiny_corpus, out=tmp_path / "b", encoder=tiny_encoder_dir,
                                     generator=tiny_generator_dir, quantize="fp32", parity_prompts=2, max_context=512,
                                     dev=dev))
    manifest = json.loads((bundle / "manifest.json").read_text())
    modes = manifest["parity"]["answer_modes"]
    assert set(modes) == {"concat", "extract"} and modes["extract"]["f1"] > modes["concat"]["f1"]
    assert manifest["rag"]["mode"] == "extract" and manifest["rag"]["extract"]["words"] in EXTRACT_WORDS
    assert manifest["schema_version"] == SCHEMA_VERSION == 7          # older readers would refuse every request
    answer = Engine.open(bundle).ask("How do I copy a list?")
    assert answer.mode == "extract" and answer.grounded == 1.0
    assert answer.answer.startswith("Use list.copy() or a slice a[:] to copy a list.")


def test_answer_mode_named_at_export_is_the_default_without_dev(tiny_corpus, tiny_encoder_dir, tiny_generator_dir,
                                                               tmp_path):
    from ragrt import Engine
    from ragrt.errors import UserInputError
    from ragrt.export.pipeline import ExportConfig, run_export
    import pytest
    config = ExportConfig(corpus=tiny_corpus, out=tmp_path / "b", encoder=tiny_encoder_dir,
                          generator=tiny_generator_dir, quantize="fp32", parity_prompts=2, max_context=512,
                          answer_mode="extract")
    with pytest.raises(UserInputError, match="--answer-mode must be auto or one of"):
        run_export(ExportConfig(**{**config.__dict__, "answer_mode": "quote"}))
    bundle = run_export(config)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["rag"]["mode"] == "extract" and manifest["schema_version"] == 7
    assert manifest["parity"]["answer_modes"] == {}
    assert Engine.open(bundle).ask("What does the GIL do?").grounded == 1.0
