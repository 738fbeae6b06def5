"""Records as users write them (issue 13, cases C05, C06, C07, C16 of the 2026-11-30 replay): blank and numeric
fields, preference pairs that compare nothing, lengths past max_length or the model's context, and preference
pairs in TRL's implicit-prompt format. Each count asserted here is worked out by hand in the comment next to it."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, run_here, run_stage
from test_bad_inputs import assert_nothing_finished, assert_one_line_error
from tests_helpers import build_distilbert, build_encoder_tokenizer

from rlhf_trl.cli import UserError
from rlhf_trl.data import as_text, convert, load_dataset_for, load_records, split_implicit_prompt
from rlhf_trl.modeling import context_length, load_tokenizer
from rlhf_trl.rewards import encode_pairs

CASES = Path(__file__).parent / "cases"  # the reported input files, see cases/README.md

SKY = "Name the color of the sky."


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def sft_rows(source) -> list[tuple[str, str]]:
    return [(r["prompt"][-1]["content"], r["completion"][-1]["content"]) for r in load_dataset_for(str(source), "sft")]


def pair(prompt: str, chosen: str, rejected: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


# ------------------------------------------------------------------------------------------- C05: fields


@pytest.mark.parametrize(
    ("value", "expected"),
    [(2.0, "2"), (2.5, "2.5"), (1969, "1969"), (0, "0"), (float("nan"), None), (None, None), (" \t", None)],
)
def test_numbers_are_text_and_blanks_are_absent(value, expected):
    assert as_text(value) == expected


def test_numpy_numbers_from_pandas_are_text_too():
    import numpy as np

    assert (as_text(np.int64(5)), as_text(np.float64(2.0)), as_text(np.float64("nan"))) == ("5", "2", None)


def test_alpaca_inputs_empty_null_blank_or_missing_are_absent():
    # C05 alpaca_inputs.jsonl: input "", null, " ", "a red apple", missing -> only line 4 has an input.
    rows = sft_rows(CASES / "c05/alpaca_inputs.jsonl")
    assert [prompt for prompt, _ in rows] == [
        SKY,
        "Name the color of the leaf.",
        "Name the color of the snow.",
        "Describe this object.\n\na red apple",
        "Name the color of the night.",
    ]


@pytest.mark.parametrize("name", ["alpaca_mixed_input.csv", "alpaca_blank_input.csv"])
def test_csv_blank_and_whitespace_inputs_are_absent(name):
    # mixed: blank cells and a " " cell on line 3 -> no input but on "Describe this object."; blank: no input at all.
    prompts = [prompt for prompt, _ in sft_rows(CASES / "c05" / name)]
    assert prompts[0] == SKY and prompts[2] == "Name the color of the snow."
    assert prompts[3] == ("Describe this object.\n\na red apple" if "mixed" in name else "Describe this object.")


def test_csv_numbers_are_text():
    # numeric_output.csv: answers 5, 8, 1969 (an integer column); numeric_input.csv: inputs 2, 5 and a blank (a float
    # column 2.0, 5.0, NaN once read) with answers 4, 10, 0.
    assert sft_rows(CASES / "c05/alpaca_numeric_output.csv") == [
        ("Add the two numbers.\n\n2 3", "5"),
        ("Add the two numbers.\n\n4 4", "8"),
        ("What year did the event happen?", "1969"),
    ]
    assert sft_rows(CASES / "c05/alpaca_numeric_input.csv") == [
        ("Double the number.\n\n2", "4"),
        ("Double the number.\n\n5", "10"),
        ("Double the number.", "0"),
    ]


def test_csv_cells_are_the_text_in_the_file(tmp_path):
    # Type inference would read 3.10 -> 3.1, 02134 -> 2134, 1.50 -> 1.5, 007 -> 7 and the input "NA" as missing;
    # each answer and input must come back exactly as written, and only the blank input cells are absent.
    path = tmp_path / "answers.csv"
    path.write_text(
        "instruction,input,output\n"
        "Which Python version?,,3.10\n"
        "Zip code of Boston?,,02134\n"
        "Price in dollars?,NA,1.50\n"
        "Agent number?,,007\n",
        encoding="utf-8",
    )
    assert sft_rows(path) == [
        ("Which Python version?", "3.10"),
        ("Zip code of Boston?", "02134"),
        ("Price in dollars?\n\nNA", "1.50"),
        ("Agent number?", "007"),
    ]
    assert [r["input"] for r in load_records(str(path))] == [None, None, "NA", None]


def test_csv_with_a_repeated_column_is_refused(tmp_path):
    path = tmp_path / "twice.csv"
    path.write_text("instruction,output,output\na,b,c\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"twice.csv: column 'output' appears more than once in the header"):
        load_records(str(path))


def test_a_required_blank_field_is_named(tmp_path):
    source = write_jsonl(
        tmp_path / "x.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": " "}]
    )
    with pytest.raises(UserError, match=r"x.jsonl line 2: field 'output' is empty: every record needs it"):
        convert(load_records(source), "sft", source)


def write_data_recipe(tmp_path, world, raw: str) -> str:
    settings = {
        "raw_dataset": raw,
        "output_dir": str(tmp_path / "processed"),
        "tokenizer_name_or_path": str(world / "models/base"),
        "max_tokens": 200,
        "eval_size": 0.2,
    }
    recipe = tmp_path / "data.yaml"
    recipe.write_text("".join(f"{key}: {value}\n" for key, value in settings.items()))
    return str(recipe)


@pytest.mark.parametrize("name", ["alpaca_inputs.jsonl", "alpaca_numeric_output.csv"])
def test_make_data_keeps_every_valid_record(tmp_path, world, name):
    from rlhf_trl.prepare import main

    main(["--config", write_data_recipe(tmp_path, world, str(CASES / "c05" / name))])
    report = json.loads((tmp_path / "processed/data_report.json").read_text())
    # 5 (jsonl) or 3 (csv) records, all valid: none dropped (before the fix the " " input was dropped as invalid).
    assert report["kept"] == report["raw_records"] == {"alpaca_inputs.jsonl": 5, "alpaca_numeric_output.csv": 3}[name]
    assert report["dropped"]["invalid"] == 0


def test_make_data_with_nothing_left_says_why(tmp_path, world):
    from rlhf_trl.prepare import main

    raw = write_jsonl(
        tmp_path / "raw.jsonl", [{"instruction": "a", "output": ""}, {"instruction": "b", "output": None}]
    )
    with pytest.raises(UserError) as error:
        main(["--config", write_data_recipe(tmp_path, world, raw)])
    assert str(error.value) == (
        f"{raw}: only 0 usable examples after cleaning: need at least 2 (dropped: 2 invalid; "
        "line 1: field 'output' is empty: every record needs it; "
        "line 2: field 'output' is empty: every record needs it)"
    )


# ------------------------------------------------------------------------------ C07: pairs that compare nothing


def test_seed_files_with_duplicates_and_identical_answers(world):
    # c07/seed: 16 prompts; items 1, 5, 9 and 13 appear twice in accepted_data.jsonl (once in upper case), so they join
    # into 2 pairs each: 12 + 4 * 2 = 20 pairs. The 8 even items have the same answer in both files: 8 identical,
    # 20 - 8 = 12 remain. pairs_identical.jsonl: 16 pairs, the 8 even ones identical, 8 remain.
    tokenizer = load_tokenizer(world / "models/base")
    seed = load_dataset_for(str(CASES / "c07/seed"), "reward")
    kept, counts = encode_pairs(tokenizer, seed, 96)
    assert (len(seed), counts["identical"], len(kept)) == (20, 8, 12)
    kept, counts = encode_pairs(tokenizer, load_dataset_for(str(CASES / "c07/pairs_identical.jsonl"), "reward"))
    assert (counts["read"], counts["identical"], len(kept)) == (16, 8, 8)


def test_pairs_identical_once_encoded_or_truncated_are_dropped(tmp_path):
    texts = ["describe the river", "it is long", "it is blue"]
    tokenizer = build_encoder_tokenizer(texts * 20)  # uncased WordPiece, as DistilBERT's
    long_answer = "it is long " * 20
    pairs = convert(
        [
            pair("describe the river", "It is BLUE", "it is blue"),  # the same ids once lowercased
            pair("describe the river", long_answer + "yes", long_answer + "no"),  # differ only past 16 tokens
            pair("describe the river", long_answer, "it is blue"),  # kept, its chosen side truncated
            pair("describe the river", "it is long", "it is blue"),  # kept as it is
        ],
        "reward",
        "pairs",
    )
    kept, counts = encode_pairs(tokenizer, pairs, max_length=16)
    assert [row["index"] for row in kept] == [2, 3]
    assert dict(counts) == {"read": 4, "identical": 0, "identical_encoded": 2, "truncated": 1}


def test_reward_stage_drops_identical_pairs_and_measures_accuracy_without_them(world, tmp_path):
    result = run_stage(
        "reward",
        "--model_name_or_path",
        str(world / "models/base"),
        "--dataset_name",
        str(CASES / "c07/seed"),
        "--eval_dataset_name",
        str(CASES / "c07/seed_eval"),
        "--output_dir",
        str(tmp_path / "reward"),
        "--max_steps",
        "1",
        "--label_mix",
        "generated",
        "--save_strategy",
        "no",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The same 20/8/12 as test_seed_files_with_duplicates_and_identical_answers, for both splits.
    assert "reward: training pairs: 20 read, 8 dropped (chosen == rejected), 12 kept" in result.stdout
    assert "reward: eval pairs: 20 read, 8 dropped (chosen == rejected), 12 kept" in result.stdout
    assert "held-out pairwise accuracy" in result.stdout and "on 12 pairs" in result.stdout


def test_reward_held_out_accuracy_counts_every_pair_not_batch_means(world, tmp_path):
    # 13 held-out pairs in evaluation batches of 8 (8 + 5). TRL logs the mean of the two batch accuracies
    # (a/8 + b/5) / 2; the stage must print (a + b) / 13, the share of pairs whose chosen answer the saved model
    # scores strictly higher, as rescoring it with score_answers gives. The two differ unless a/8 == b/5.
    import re

    from rlhf_trl.evaluate import load_reward_model, message_text, pairwise_accuracy
    from rlhf_trl.metrics_log import read_metrics
    from rlhf_trl.outputs import read_marker
    from rlhf_trl.rewards import score_answers

    lines = (world / "data/pairs_eval.jsonl").read_text(encoding="utf-8").splitlines()[:13]
    held_out = tmp_path / "pairs_13.jsonl"
    held_out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    output = tmp_path / "reward"
    result = run_stage(
        "reward",
        *("--model_name_or_path", str(world / "models/base"), "--dataset_name", str(world / "data/pairs_train.jsonl")),
        *("--eval_dataset_name", str(held_out), "--per_device_eval_batch_size", "8", "--output_dir", str(output)),
        *("--max_steps", "4", "--label_mix", "generated", "--save_strategy", "no"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reward: eval pairs: 13 read, 13 kept" in result.stdout

    model, tokenizer = load_reward_model(output)
    pairs = load_dataset_for(str(held_out), "reward")
    prompts = [p["prompt"] for p in pairs]
    chosen = score_answers(model, tokenizer, prompts, [message_text(p["chosen"]) for p in pairs], max_length=96)
    rejected = score_answers(model, tokenizer, prompts, [message_text(p["rejected"]) for p in pairs], max_length=96)
    right = sum(c > r for c, r in zip(chosen, rejected, strict=True))
    first = sum(c > r for c, r in zip(chosen[:8], rejected[:8], strict=True))  # the first batch's hits
    assert first * 5 != (right - first) * 8, (
        "this model ranks both batches alike: batch means would give the same number"
    )
    assert pairwise_accuracy(chosen, rejected) == right / 13
    printed = re.search(r"held-out pairwise accuracy (\d\.\d{3}) on 13 pairs \((\d+) ranked right\)", result.stdout)
    assert printed and (printed[1], int(printed[2])) == (f"{right / 13:.3f}", right)
    assert read_marker(output)["eval_accuracy"] == right / 13
    assert [r["eval_accuracy"] for r in read_metrics(output) if "eval_accuracy" in r][-1] == right / 13


class LengthScorer:
    """A stand-in reward model whose score is the number of tokens scored: the accuracy is known by hand."""

    def parameters(self):
        import torch

        yield torch.zeros(1)

    def __call__(self, input_ids, attention_mask, **_):
        return SimpleNamespace(logits=attention_mask.sum(-1, keepdim=True).float())


def test_eval_pairwise_accuracy_leaves_identical_pairs_out(world):
    from rlhf_trl.evaluate import reward_accuracy

    tokenizer = load_tokenizer(world / "models/base")
    pairs = convert(
        [
            pair("Describe the river.", "The river is long and wide.", "It is."),  # longer chosen: a hit
            pair("Describe the river.", "The river is long.", "The river is long."),  # a tie: left out
            pair("Describe the lake.", "The lake is deep and blue.", "No."),  # a hit
            pair("Describe the lake.", "No.", "No."),  # a tie: left out
        ],
        "reward",
        "pairs",
    )
    lines = []
    accuracy, counts = reward_accuracy(LengthScorer(), tokenizer, pairs, lines.append)
    # 2 hits out of the 2 pairs that compare something; counting the ties as misses would have given 2/4 = 0.5.
    assert (accuracy, counts["kept"]) == (1.0, 2)
    assert lines == ["eval: held-out pairs: 4 read, 2 dropped (chosen == rejected), 2 kept"]


# ---------------------------------------------------------------------------------------------- C06: lengths


def test_context_length_reads_each_architectures_key():
    from transformers import DistilBertConfig, GPT2Config, LlamaConfig

    assert context_length(GPT2Config(n_positions=64)) == 64
    assert context_length(DistilBertConfig(max_position_embeddings=128)) == 128
    assert context_length(LlamaConfig(max_position_embeddings=4096)) == 4096


def build_gpt2_with_context(world, path: Path, positions: int) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = load_tokenizer(world / "models/base")
    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=positions,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def demo_recipe(stage: str) -> tuple[str, str]:
    return "--config", str(ROOT / "recipes/demo" / f"{stage}.yaml")


def test_sft_max_length_past_the_models_context_stops_before_training(world, tmp_path):
    model = build_gpt2_with_context(world, tmp_path / "gpt2-ctx64", 64)  # C06 item 1: 64 positions, max_length 200
    output = tmp_path / "sft"
    args = ("--model_name_or_path", str(model), "--dataset_name", str(world / "data/sft_train.jsonl"))
    args += ("--eval_dataset_name", str(world / "data/sft_eval.jsonl"))
    result = run_here("sft", *demo_recipe("sft"), *args, "--output_dir", str(output), "--max_length", "200")
    assert_one_line_error(result, "max_length 200 exceeds the model's context of 64 tokens")
    assert_nothing_finished(output)


def test_reward_max_length_past_an_encoders_context_stops_before_training(world, tmp_path):
    from rlhf_trl import demo

    # C06 item 2: a DistilBERT reward model with its own tokenizer and 128 positions, max_length 512.
    model = build_distilbert(build_encoder_tokenizer(demo.corpus(demo.make_records())), tmp_path / "distilbert")
    output = tmp_path / "reward"
    args = ("--model_name_or_path", str(model), "--dataset_name", str(world / "data/pairs_train.jsonl"))
    args += ("--eval_dataset_name", str(world / "data/pairs_eval.jsonl"), "--label_mix", "generated")
    result = run_here("reward", *demo_recipe("reward"), *args, "--output_dir", str(output), "--max_length", "512")
    assert_one_line_error(result, "max_length 512 exceeds the model's context of 128 tokens")
    assert_nothing_finished(output)


RIVER = "Describe the river."  # 4 tokens with the demo tokenizer; its chat template adds 3 around a prompt
LONG = "The river is long. "


def sft_records() -> list[dict]:
    return [
        {"instruction": RIVER, "output": "The river is long."},  # 7 prompt + 6 answer tokens: whole
        {"instruction": RIVER, "output": LONG * 20},  # 7 prompt tokens, 128 with the answer: the answer is cut at 64
        {"instruction": RIVER + " " + RIVER * 20, "output": "The river is long."},  # 88 prompt tokens: no answer left
        {"instruction": RIVER * 30, "output": "The river is long."},  # 123 prompt tokens: likewise
    ]


def test_sft_leaves_out_and_counts_records_whose_answer_truncation_would_remove(world, tmp_path, capsys):
    from datasets import Dataset

    from rlhf_trl.sft import prepare_records

    data = write_jsonl(tmp_path / "sft.jsonl", sft_records())
    dataset = load_dataset_for(data, "sft")
    args = SimpleNamespace(
        max_length=64, packing=False, truncation_mode="keep_start", completion_only_loss=None, assistant_only_loss=False
    )
    kept = prepare_records(Dataset.from_list(dataset), load_tokenizer(world / "models/base"), args)
    # Records 3 and 4 have prompts over 64 tokens (left out); record 2's answer runs past 64 (kept, truncated).
    assert [row["completion"][0]["content"] for row in kept] == ["The river is long.", LONG * 20]
    out = capsys.readouterr().out
    assert "sft: left out 2 of 4 training examples whose prompt alone fills max_length 64 tokens" in out
    assert "sft: 1 of 4 training examples have their answer truncated to fit max_length 64" in out


def test_sft_keep_end_and_packing_count_what_they_cut(world, tmp_path, capsys):
    # D03's kind in SFT. keep_end keeps the last 64 tokens: records 2 (128 tokens), 3 (94) and 4 (129) lose the start
    # of their prompt, none is left out (the answer is at the end), and record 2's answer alone (121 tokens) fills
    # max_length: no prompt token is left. Packing with TRL's default bfd cuts the same 3 records to their first 64
    # tokens (the answer's end is lost); bfd_split carries the overflow into other rows.
    from datasets import Dataset

    from rlhf_trl.sft import prepare_records

    dataset = Dataset.from_list(load_dataset_for(write_jsonl(tmp_path / "sft.jsonl", sft_records()), "sft"))
    tokenizer = load_tokenizer(world / "models/base")
    args = SimpleNamespace(
        max_length=64, packing=False, truncation_mode="keep_end", completion_only_loss=None, assistant_only_loss=False
    )
    assert len(prepare_records(dataset, tokenizer, args)) == 4
    assert capsys.readouterr().out == (
        "sft: 3 of 4 training examples lose the start of their prompt to max_length 64 (truncation_mode keep_end); "
        "1 of them keep no prompt token (the answer alone fills it)\n"
    )
    for strategy, what in (("bfd", "lose their end (the answer's last tokens)"), ("bfd_split", "are split across")):
        args.packing, args.packing_strategy = True, strategy
        assert len(prepare_records(dataset, tokenizer, args)) == 4
        assert capsys.readouterr().out.startswith(
            f"sft: 3 of 4 training examples are longer than max_length 64 and {what}"
        )


def test_sft_stage_prints_the_count_and_trl_drops_nothing_more(world, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_records())
    result = run_stage(
        "sft",
        *("--model_name_or_path", str(world / "models/base"), "--dataset_name", data, "--eval_dataset_name", data),
        *("--output_dir", str(tmp_path / "sft"), "--max_steps", "1", "--max_length", "64", "--save_strategy", "no"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sft: left out 2 of 4 training examples" in result.stdout
    assert "sft: left out 2 of 4 eval examples" in result.stdout
    assert "TRL left out" not in result.stdout, "TRL found fully masked examples our count missed"


def test_ppo_counts_prompts_over_max_prompt_length(world, capsys):
    from datasets import Dataset

    from rlhf_trl.ppo import tokenize_prompts

    prompts = [[{"role": "user", "content": RIVER * n}] for n in (1, 2, 20, 30)]
    kept = tokenize_prompts(
        Dataset.from_list([{"prompt": p} for p in prompts]), load_tokenizer(world / "models/base"), 48
    )
    # RIVER once or twice: 7 or 11 tokens; 20 or 30 times: 83 or 123 tokens, over 48 (C06 item 4).
    assert len(kept) == 2
    assert "ppo: left out 2 of 4 training prompts longer than max_prompt_length=48 tokens" in capsys.readouterr().out


def test_reward_prints_truncated_pairs(world, capsys):
    from rlhf_trl.reward import tokenize_pairs

    pairs = convert([pair(RIVER, "The river is long.", "It is."), pair(RIVER, LONG * 20, "It is.")], "reward", "pairs")
    kept = tokenize_pairs(pairs, load_tokenizer(world / "models/base"), 32)
    # The second chosen side is 128 tokens with its prompt, cut to its last 32; both pairs still differ.
    assert len(kept) == 2 and len(kept[1]["chosen_ids"]) == 32
    assert "reward: training pairs: 2 read, 1 truncated to max_length 32 tokens, 2 kept" in capsys.readouterr().out


# ---------------------------------------------------------------------------- C16: the implicit-prompt format


SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
USER = {"role": "user", "content": "Tell me about the castle."}


def conversation(answer: str, *opening: dict) -> list[dict]:
    return [*opening, {"role": "assistant", "content": answer}]


def test_shared_opening_messages_are_the_prompt():
    prompt, chosen, rejected = split_implicit_prompt(
        conversation("It is old.", SYSTEM, USER), conversation("It is dry.", SYSTEM, USER), "x line 1"
    )
    assert prompt == [SYSTEM, USER]
    assert (chosen, rejected) == ([{"role": "assistant", "content": "It is old."}], [conversation("It is dry.")[0]])


def test_identical_conversations_split_before_the_last_answer():
    # TRL's extract_prompt would find no difference; the prompt still ends before the last assistant turn, and the
    # pair is then dropped as identical by the reward stage.
    prompt, chosen, rejected = split_implicit_prompt(conversation("A.", USER), conversation("A.", USER), "x line 1")
    assert prompt == [USER] and chosen == rejected == [{"role": "assistant", "content": "A."}]


@pytest.mark.parametrize(
    ("chosen", "rejected", "expected"),
    [
        (
            "\n\nHuman: What color is the sky?\n\nAssistant: It is blue.",
            "\n\nHuman: What color is the sky?\n\nAssistant: It is green.",
            ("Human: What color is the sky?\n\nAssistant:", "It is blue.", "It is green."),
        ),
        (  # both answers open with "I am": the cut stays just after the answer marker
            "Human: Hi.\n\nAssistant: I am sorry.",
            "Human: Hi.\n\nAssistant: I am fine.",
            ("Human: Hi.\n\nAssistant:", "I am sorry.", "I am fine."),
        ),
        ("Sky color? It is blue.", "Sky color? It is bad.", ("Sky color? It is", "blue.", "bad.")),  # not "It is b"
    ],
)
def test_plain_text_transcripts_split_at_a_boundary(chosen, rejected, expected):
    assert split_implicit_prompt(chosen, rejected, "x line 1") == expected


def test_turns_that_differ_before_the_last_answer_are_refused():
    other = {"role": "user", "content": "Tell me about the river."}
    with pytest.raises(UserError, match=r"x line 4: 'chosen' and 'rejected' differ at message 2, before their last"):
        split_implicit_prompt(conversation("A.", SYSTEM, USER), conversation("B.", SYSTEM, other), "x line 4")


def test_a_pair_with_no_shared_prompt_names_its_line(world, tmp_path):
    data = write_jsonl(
        tmp_path / "pairs.jsonl",
        [
            {"chosen": conversation("Old.", USER), "rejected": conversation("Dry.", USER)},
            {"chosen": "Castles are old.", "rejected": "Rivers are long."},
        ],
    )
    args = ("--model_name_or_path", str(world / "models/base"), "--dataset_name", data, "--eval_dataset_name", data)
    output = tmp_path / "reward"
    result = run_here("reward", *demo_recipe("reward"), *args, "--output_dir", str(output), "--label_mix", "generated")
    assert_one_line_error(result, f"{data} line 2: 'chosen' and 'rejected' share no opening text")
    assert_nothing_finished(output)


def test_reward_stage_trains_on_implicit_prompt_conversations_with_a_system_turn(world, tmp_path):
    data = str(CASES / "c16/implicit_pairs.jsonl")  # 40 lines, each [system, user, assistant] on both sides
    [first] = load_dataset_for(data, "reward")[:1]
    assert [m["role"] for m in first["prompt"]] == ["system", "user"] and len(first["chosen"]) == 1
    output = tmp_path / "reward"
    result = run_stage(
        "reward",
        *("--model_name_or_path", str(world / "models/base"), "--dataset_name", data, "--eval_dataset_name", data),
        *("--output_dir", str(output), "--max_steps", "2", "--label_mix", "generated", "--save_strategy", "no"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reward: training pairs: 40 read, 40 kept" in result.stdout
    assert "on 40 pairs" in result.stdout and (output / "rlhf_trl_run.json").is_file()
