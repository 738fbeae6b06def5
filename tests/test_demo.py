"""The demo world: its ground-truth rule, its determinism and its tokenizer."""

from rlhf_trl import demo


def test_ground_truth_rewards_only_well_formed_polite_on_topic_answers():
    prompt = "Describe the river."
    good = "The river is long. It is often found in a valley. I hope this helps!"
    assert demo.ground_truth_score(prompt, good) == 1.0
    assert demo.ground_truth_score(prompt, "The river is long. It is often found in a valley.") == 0.0
    assert demo.ground_truth_score(prompt, good.replace("long", "sour")) == 0.0, "wrong fact"
    assert demo.ground_truth_score(prompt, good.replace("river", "tiger")) == 0.0, "off topic"
    assert demo.ground_truth_score(prompt, good + " I hope this helps!") == 0.0, "repeated closing"
    assert demo.ground_truth_score("Hello there.", good) == 0.0, "no subject in the prompt"


def test_records_are_deterministic_and_pairs_follow_the_rule():
    first, second = demo.make_records(seed=3), demo.make_records(seed=3)
    assert first == second and first != demo.make_records(seed=4)
    for pair in first["pairs_train"][:200]:
        prompt = pair["prompt"][0]["content"]
        chosen, rejected = pair["chosen"][0]["content"], pair["rejected"][0]["content"]
        assert demo.ground_truth_score(prompt, rejected) <= demo.ground_truth_score(prompt, chosen)


def test_eval_prompts_use_phrasings_that_reward_and_ppo_never_see():
    records = demo.make_records()

    def phrasing(row):
        return demo.mentioned_subject(row["prompt"][0]["content"]) and row["prompt"][0]["content"].split(" the ")[0]

    held_out = {h.split(" the ")[0] for h in demo.HELD_OUT_INSTRUCTIONS}
    assert {phrasing(r) for r in records["prompts_eval"]} <= held_out
    assert not {phrasing(r) for r in records["prompts_train"] + records["pairs_train"]} & held_out


def test_tokenizer_round_trips_text_and_has_a_chat_template():
    tokenizer = demo.build_tokenizer(demo.corpus(demo.make_records()))
    text = "Tell me about the volcano, please! Ünïcode too."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<|user|>hi\n<|assistant|>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
