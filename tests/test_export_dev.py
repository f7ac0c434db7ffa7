"""`ragrt export --dev`: the defaults the export measures on dev answers, on the tiny models."""
import json

from ragrt.export.pipeline import EXTRACT_WORDS
from ragrt.options import PASSAGE_KV_REPAIR


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
    blocks = manifest["parity"]["passage_kv"]       # measured with the repair the bundle ships
    assert blocks["repair"] == manifest["rag"]["passage_kv_repair"] == PASSAGE_KV_REPAIR
    assert blocks["dev_questions"] == 2
    assert manifest["rag"]["passage_kv"] == ("on" if blocks["f1_blocks"] >= blocks["f1_full"] - 0.01 else "off")
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


def test_passage_kv_default_follows_dev_f1_and_else_the_calibrated_agreement():
    from ragrt.bundle.manifest import PassageKVParity
    from ragrt.export.pipeline import PASSAGE_KV_AGREEMENT, passage_kv_holds_on_dev, passage_kv_on_without_dev
    measured = PassageKVParity(trained=False, agreement=PASSAGE_KV_AGREEMENT - 0.1, prompts=20, new_tokens=24,
                               repair=PASSAGE_KV_REPAIR, dev_questions=36, f1_full=0.30, f1_blocks=0.295)
    assert passage_kv_holds_on_dev(measured)                # dev F1 decides, over a low agreement
    assert not passage_kv_holds_on_dev(PassageKVParity(**{**measured.__dict__, "f1_blocks": 0.285, "agreement": 1.0}))
    unmeasured = PassageKVParity(trained=False, agreement=PASSAGE_KV_AGREEMENT, prompts=20, new_tokens=24)
    assert passage_kv_on_without_dev(unmeasured, fine_tuned=False)
    assert not passage_kv_on_without_dev(PassageKVParity(**{**unmeasured.__dict__,
                                                            "agreement": PASSAGE_KV_AGREEMENT - 0.001}),
                                         fine_tuned=False)
    # The calibration is the base generator's: a fine-tuned one, block-trained or not, needs dev answers.
    assert not passage_kv_on_without_dev(PassageKVParity(**{**unmeasured.__dict__, "agreement": 1.0}), fine_tuned=True)
    assert passage_kv_holds_on_dev(PassageKVParity(**{**measured.__dict__, "trained": True}))


def test_a_block_trained_generator_is_repaired_as_it_was_trained(tiny_corpus, tiny_encoder_dir, tiny_generator_dir,
                                                                 tmp_path):
    import shutil
    from ragrt.export.pipeline import ExportConfig, run_export
    from ragrt.export.train.finetune import TRAINING_RECORD
    generator = tmp_path / "generator"
    shutil.copytree(tiny_generator_dir, generator)
    # Trained before the repair existed: its record names none, so its blocks are read unrepaired.
    (generator / TRAINING_RECORD).write_text(json.dumps({"block_attention": True, "block_attention_mix": 0.5}))
    bundle = run_export(ExportConfig(corpus=tiny_corpus, out=tmp_path / "b", encoder=tiny_encoder_dir,
                                     generator=generator, quantize="fp32", parity_prompts=2, max_context=512))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["parity"]["passage_kv"]["trained"] is True
    assert manifest["parity"]["passage_kv"]["repair"] == manifest["rag"]["passage_kv_repair"] == 0
