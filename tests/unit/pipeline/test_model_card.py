"""The model card: Hub-parsable metadata, results only for the exported step, facts in the body."""

from huggingface_hub import ModelCard

from pipeline.config import load_config
from pipeline.model_card import CardEvaluation, TrainingFacts, render_model_card

FACTS = TrainingFacts(step=300, tokens_seen=1_228_800, world_size=2, zero_stage=3, n_params=558_000,
                      dtype="bf16", vocab_size=1000)


def evaluation(step: int) -> CardEvaluation:
    return CardEvaluation(step=step, split="val", n_samples=16, perplexity=12.5, segment_perplexity=(15.1, 9.25),
                          table_markdown="| segment | ppl |\n|---|---|\n| 0 | 15.1 |", plot_file="per_segment_perplexity.png")


def card(overrides: list[str], ev: CardEvaluation | None) -> ModelCard:
    cfg = load_config(None, overrides)
    return ModelCard(render_model_card(cfg, "me/rmt-tiny", FACTS, ev))


def test_metadata_parses_with_results_of_the_exported_step() -> None:
    parsed = card(["data.source=hf:deepmind/pg19", "memory.kind=armt", "export.tags=[pg19, armt]"], evaluation(300))
    data = parsed.data
    assert data.license == "apache-2.0" and data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation"
    assert "memory-armt" in data.tags and data.tags.count("armt") == 1 and "pg19" in data.tags
    assert data.datasets == ["deepmind/pg19"]
    values = {r.metric_name: r.metric_value for r in data.eval_results}
    assert values["Perplexity"] == 12.5 and 9.25 in values.values()
    assert all(r.dataset_type == "deepmind/pg19" and r.dataset_split == "validation" for r in data.eval_results)


def test_body_has_table_plot_facts_and_loading() -> None:
    text = card([], evaluation(300)).text
    assert "| 0 | 15.1 |" in text and "](per_segment_perplexity.png)" in text
    for fact in ["1,228,800", "2 ranks", "ZeRO stage 3", "`rmt`, 8 memory tokens", "8 x 128 tokens", "bf16"]:
        assert fact in text, fact
    assert 'from_pretrained("me/rmt-tiny", trust_remote_code=True)' in text and "generate(" in text


def test_other_step_evaluation_is_labelled_and_not_in_model_index() -> None:
    parsed = card(["data.source=synthetic:50"], evaluation(200))
    assert not parsed.data.eval_results and not parsed.data.datasets
    assert "step 200, not on this one (step 300)" in parsed.text


def test_no_evaluation_says_how_to_make_one() -> None:
    parsed = card([], None)
    assert not parsed.data.eval_results and "memtrain eval --checkpoint" in parsed.text


def test_local_paths_never_reach_the_card_and_base_model_is_set(tmp_path) -> None:
    base = tmp_path / "scratch" / "llama-base"
    base.mkdir(parents=True)
    (base / "config.json").write_text('{"model_type": "gpt2", "_name_or_path": "openai-community/gpt2"}')
    source = tmp_path / "shared" / "books"
    parsed = card([f"data.source={source}", f"model.pretrained={base}"], evaluation(300))
    assert str(tmp_path) not in str(parsed)  # neither metadata nor body
    assert parsed.data.base_model == "openai-community/gpt2" and "`openai-community/gpt2`" in parsed.text
    chosen = card([f"data.source={source}", f"model.pretrained={base}", "export.base_model=me/base",
                   "export.datasets=[me/books]", "export.language=[en, de]"], evaluation(300))
    assert chosen.data.base_model == "me/base" and chosen.data.datasets == ["me/books"]
    assert chosen.data.language == ["en", "de"]
    (base / "config.json").write_text(f'{{"model_type": "gpt2", "_name_or_path": "{base}"}}')  # saved from a path
    assert card([f"model.pretrained={base}"], None).data.base_model is None


def test_batch_row_follows_global_batch_size() -> None:
    text = card(["train.global_batch_size=16", "train.micro_batch_size=2"], None).text  # 2 ranks in FACTS
    assert "2 per rank x 4 accumulation steps x 2 ranks = 16 samples" in text
