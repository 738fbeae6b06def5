"""DPO (rlhf_trl.dpo): trains a LoRA on the SFT model from preference pairs, saves, reloads and generates; resumes
after SIGKILL to the uninterrupted result; refuses bad input with one line."""

import json
import re
import signal
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_here, run_stage, stage_paths, start_stage, wait_until
from safetensors.torch import load_file
from test_bad_inputs import assert_one_line_error as one_line_error

from rlhf_trl.cli import UserError
from rlhf_trl.metrics_log import read_metrics
from rlhf_trl.modeling import base_of, generate, load_model, load_tokenizer
from rlhf_trl.outputs import MANIFEST, partial_dir, read_marker


def dpo_args(paths, output_dir, *extra):
    data = paths["data"]
    return (
        "--sft_model_path",
        paths["sft"],
        "--dataset_name",
        f"{data}/pairs_train.jsonl",
        "--eval_dataset_name",
        f"{data}/pairs_eval.jsonl",
        "--label_mix",
        "generated",  # the recipe's human_labels file may exist in this checkout's data/
        "--max_train_samples",
        "160",
        "--per_device_train_batch_size",
        "8",
        "--max_steps",
        "10",
        "--logging_steps",
        "1",
        "--output_dir",
        str(output_dir),
        *extra,
    )


@pytest.fixture(scope="module")
def dpo(trained) -> dict:
    """One uninterrupted DPO run on the session's SFT model: its paths plus its stdout."""
    paths = stage_paths(Path(trained["data"]).parent) | {"sft": trained["sft"]}
    result = run_stage("dpo", *dpo_args(paths, paths["dpo"]))
    assert result.returncode == 0, f"dpo failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return paths | {"stdout": result.stdout}


def test_dpo_trains_a_lora_on_the_sft_model_that_reloads_and_generates(dpo):
    marker = read_marker(dpo["dpo"])
    assert marker["stage"] == "dpo" and marker["tokens_generated"] == 0 and marker["eval_pairs"] == 200
    assert base_of(dpo["dpo"]) == dpo["sft"]
    assert "dpo: training pairs: 160 read, 160 kept" in dpo["stdout"]
    assert re.search(
        r"dpo: reward accuracy \d\.\d\d -> \d\.\d\d, margin .* held-out loss \d+\.\d{3} on 200", dpo["stdout"]
    )
    weights = load_file(str(Path(dpo["dpo"]) / "adapter_model.safetensors"))
    b_weights = [t for name, t in weights.items() if "lora_B" in name]
    assert b_weights and all(t.abs().sum() > 0 for t in b_weights), "LoRA B starts at 0: every one must have trained"
    policy, sft = load_model(dpo["dpo"]), load_model(dpo["sft"])
    assert any(not torch.equal(a, b) for a, b in zip(policy.parameters(), sft.parameters(), strict=True))
    answer = generate(policy, load_tokenizer(dpo["dpo"]), [[{"role": "user", "content": "What is a tiger?"}]])
    assert answer[0].strip()


def logged(output_dir) -> list:
    keys = ("step", "learning_rate", "rewards/accuracies", "rewards/margins", "logps/chosen", "eval_loss")
    return [{k: record[k] for k in keys if k in record} for record in read_metrics(output_dir)]


def test_a_killed_dpo_resumes_to_the_uninterrupted_result(dpo, tmp_path):
    output = tmp_path / "dpo"
    args = dpo_args(dpo, output, "--save_steps", "3")  # checkpoints do not change training
    work = partial_dir(output)
    process = start_stage("dpo", *args)
    wait_until(lambda: (work / "checkpoint-3" / "trainer_state.json").is_file(), process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert read_marker(output) is None

    result = run_stage("dpo", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"dpo: resuming from {work}/checkpoint-" in result.stdout
    assert logged(output) == logged(dpo["dpo"]) and len(logged(output)) >= 10
    resumed, uninterrupted = (load_file(str(Path(d) / "adapter_model.safetensors")) for d in (output, dpo["dpo"]))
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    assert json.loads((output / MANIFEST).read_text())["attempts"][-1]["resumed_from"].startswith("checkpoint-")


def dpo_here(*args: str):
    return run_here("dpo", "--config", str(ROOT / "recipes/demo/dpo.yaml"), *args)


def test_dpo_before_sft_names_the_make_target(tmp_path):
    result = dpo_here("--sft_model_path", str(tmp_path / "sft"), "--output_dir", str(tmp_path / "dpo"))
    one_line_error(result, "sft_model_path", "make sft RECIPE=demo")
    assert not (tmp_path / "dpo").exists() and not partial_dir(tmp_path / "dpo").exists()


@pytest.mark.parametrize(
    ("lines", "needle"),
    [
        ([], "holds no records"),
        (['{"prompt": "p", "chosen": "same", "rejected": "same"}'] * 3, "every chosen answer equals its rejected"),
    ],
    ids=["empty", "all-identical"],
)
def test_a_pairs_file_without_usable_pairs_is_one_line(dpo, tmp_path, lines, needle):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(line + "\n" for line in lines))
    args = dpo_args(dpo, tmp_path / "dpo", "--dataset_name", str(pairs))
    one_line_error(dpo_here(*args), str(pairs), needle)
    assert read_marker(tmp_path / "dpo") is None and not (tmp_path / "dpo").exists()


def test_dpo_mixes_human_labels_as_the_reward_stage_does(dpo, tmp_path):
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"prompt": "p", "chosen": "same", "rejected": "same"}\n' * 3)
    args = dpo_args(dpo, tmp_path / "dpo", "--human_labels", str(labels), "--label_mix", "human")
    result = dpo_here(*args)
    assert "dpo: training on 3 human pairs (label_mix: human)" in result.stdout
    one_line_error(result, f"no usable training pair in {labels}: every chosen answer equals its rejected")


def test_unusable_pairs_are_counted_and_left_out(capsys):
    from datasets import Dataset

    from rlhf_trl.dpo import distinct_pairs, usable_pairs

    def pair(chosen, rejected):
        prompt = [{"role": "user", "content": "q"}]
        return {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        }

    records = Dataset.from_list([pair("a", "b"), pair("a", "a"), pair("c", "d"), pair("e", "f"), pair("g", "h")])
    kept, counts = distinct_pairs(records, "pairs.jsonl")
    assert len(kept) == 4 and counts == Counter(read=5, identical=1)
    # What TRL makes of the 4 kept pairs with max_length 4: it dropped one whose prompt fills max_length.
    tokenized = Dataset.from_list(
        [
            {"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [3, 5]},  # differs at token 4: kept
            {"prompt_ids": [1, 2], "chosen_ids": [3, 4, 9], "rejected_ids": [3, 4, 8]},  # same once cut to 4
            {"prompt_ids": [1], "chosen_ids": [6, 7, 8, 9], "rejected_ids": [5]},  # kept, chosen side truncated
        ]
    )
    usable = usable_pairs(tokenized, counts, 4, "pairs.jsonl")
    assert usable["chosen_ids"] == [[3, 4], [6, 7, 8, 9]]
    line = capsys.readouterr().out.strip()
    assert line == (
        "dpo: training pairs: 5 read, 1 dropped (chosen == rejected), 1 dropped (the prompt alone fills max_length 4), "
        "1 dropped (chosen and rejected identical after encoding or truncation to max_length 4), "
        "1 truncated to max_length 4 tokens, 2 kept"
    )
    with pytest.raises(UserError, match="no usable eval pair in e.jsonl: none differs within max_length=4"):
        usable_pairs(tokenized.select([1]), Counter(read=1), 4, "e.jsonl", "eval")


def test_keep_end_counts_and_drops_pairs_as_trls_collator_cuts_them(capsys):
    # D03: with truncation_mode keep_end TRL keeps every pair (its prompt filter is keep_start's) and its collator
    # keeps each side's last max_length tokens. 6 pairs read, 1 with the same answer twice; TRL tokenized the other 5.
    # With max_length 4, by hand (the window is the last 4 of prompt + answer, and which of them are answer):
    #   1: prompt of 5 fills max_length: keep_start drops it; keep_end sees [3 4 5 6] / [3 4 5 7]: kept, truncated
    #   2: answers differ in their first token only: both windows [8 8 8 8], all answer: identical, dropped
    #   3: 3 tokens a side, nothing cut: kept
    #   4: answers of 5 tokens: windows [7 8 9 10] / [7 8 9 11], all answer: kept, truncated, no prompt token left
    #   5: the same ids [2 5 5 6] on both sides but 2 answer tokens against 4: the loss differs, kept, truncated
    # -> 6 read, 1 + 1 dropped, 3 truncated (1 of them without a prompt token), 4 kept.
    from datasets import Dataset
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    from rlhf_trl.dpo import usable_pairs

    tokenized = Dataset.from_list(
        [
            {"prompt_ids": [1, 2, 3, 4, 5], "chosen_ids": [6], "rejected_ids": [7]},
            {"prompt_ids": [1, 2], "chosen_ids": [3, 8, 8, 8, 8], "rejected_ids": [4, 8, 8, 8, 8]},
            {"prompt_ids": [1], "chosen_ids": [5, 6], "rejected_ids": [5, 7]},
            {"prompt_ids": [1, 2], "chosen_ids": [6, 7, 8, 9, 10], "rejected_ids": [6, 7, 8, 9, 11]},
            {"prompt_ids": [1, 2, 5], "chosen_ids": [5, 6], "rejected_ids": [2, 5, 5, 6]},
        ]
    )
    usable = usable_pairs(tokenized, Counter(read=6, identical=1), 4, "pairs.jsonl", mode="keep_end")
    assert usable["chosen_ids"] == [[6], [5, 6], [6, 7, 8, 9, 10], [5, 6]]
    assert capsys.readouterr().out.strip() == (
        "dpo: training pairs: 6 read, 1 dropped (chosen == rejected), 1 dropped (chosen and rejected identical after "
        "encoding or truncation to max_length 4 keeping the end), 3 truncated to their last 4 tokens (truncation_mode "
        "keep_end), 1 of them with no prompt token left (the answers alone fill max_length), 4 kept"
    )
    # What TRL's collator makes of each pair: the dropped one is the same on both sides, every kept one is not.
    collator = DataCollatorForPreference(pad_token_id=0, max_length=4, truncation_mode="keep_end")
    for index, pair in enumerate(tokenized):
        batch = collator([pair])
        same = all(torch.equal(batch[key][0], batch[key][1]) for key in ("input_ids", "completion_mask"))
        assert same == (index == 1), index
    # keep_start on the same pairs, as TRL hands them (it drops pair 1 itself: counted as the prompt filling
    # max_length): windows are the first 4 tokens, so pair 2 differs ([1 2 3 8] / [1 2 4 8]) and pair 4 does not
    # ([1 2 6 7] twice); pairs 2 and 5 are cut: 1 + 1 + 1 dropped, 2 truncated, 3 kept.
    usable_pairs(tokenized.select([1, 2, 3, 4]), Counter(read=6, identical=1), 4, "pairs.jsonl")
    assert capsys.readouterr().out.strip() == (
        "dpo: training pairs: 6 read, 1 dropped (chosen == rejected), 1 dropped (the prompt alone fills max_length 4), "
        "1 dropped (chosen and rejected identical after encoding or truncation to max_length 4), "
        "2 truncated to max_length 4 tokens, 3 kept"
    )


def test_a_prompt_merging_with_its_answer_trains_on_the_prompts_own_tokens(dpo, zoo, tmp_path):
    """Llama-2-chat's `[/INST]` + the answer's first word tokenize as one piece (tests/zoo.py): TRL would train the
    merged piece as part of the answer; DPO re-encodes those pairs as generation sees them, and says so."""
    from zoo import LLAMA2

    args = dpo_args(dpo, tmp_path / "dpo", "--sft_model_path", str(zoo[LLAMA2]), "--max_steps", "1")
    result = dpo_here(*args, "--save_strategy", "no")
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(
        r"dpo: (\d+) of \1 training pairs: the prompt's last token merges with the answer's first \(e\.g\. '.+'\); "
        r"trained as generation sees them: the prompt's own tokens, then the answer's",
        result.stdout,
    ), result.stdout[-2000:]
    assert read_marker(tmp_path / "dpo")["stage"] == "dpo"


def test_without_lora_the_reference_is_the_sft_model_even_when_sft_was_an_adapter(dpo, tmp_path):
    """TRL reloads a missing reference by the model config's name, which for a merged SFT adapter is the base: at
    the first step, before any update, the policy must equal its reference (implicit rewards exactly 0)."""
    from conftest import sft_args

    sft = tmp_path / "sft"
    args = sft_args(dpo | {"sft": str(sft)}, "--use_peft", "true", "--max_steps", "2", "--save_strategy", "no")
    assert run_here("sft", "--config", str(ROOT / "recipes/demo/sft.yaml"), *args).returncode == 0
    assert base_of(sft) == dpo["base"]
    output = tmp_path / "dpo"
    args = dpo_args(dpo | {"sft": str(sft)}, output, "--use_peft", "false", "--max_steps", "1", "--save_strategy", "no")
    result = dpo_here(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    first = next(record for record in read_metrics(output) if "rewards/margins" in record)
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["rewards/margins"] == 0.0
