"""`make eval`: the metrics on inputs whose answer is known, the stages' metrics logs, and the command itself."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_module
from test_bad_inputs import assert_one_line_error

from rlhf_trl import evaluate
from rlhf_trl.metrics_log import read_metrics
from rlhf_trl.modeling import load_model, load_tokenizer

EOS, PAD = 1, 0


def prefers_please(answer: str) -> float:
    """A reward function that only likes one word."""
    return float(answer.split().count("please"))


def test_win_rate_of_a_one_word_reward_is_exact():
    policy = ["please sit", "sit", "please please sit", "sit please", "sit"]
    reference = ["sit", "sit", "please sit", "please sit", "please sit"]
    # win, tie, win, tie, loss -> (1 + 0.5 + 1 + 0.5 + 0) / 5
    assert evaluate.win_rate([prefers_please(a) for a in policy], [prefers_please(a) for a in reference]) == 0.6
    assert evaluate.win_rate([2.0, 2.0], [1.0, 1.0]) == 1.0
    with pytest.raises(ValueError):
        evaluate.win_rate([1.0], [1.0, 2.0])


def test_pairwise_accuracy_counts_a_tie_as_wrong():
    assert evaluate.pairwise_accuracy([3.0, 1.0, 2.0, 0.5], [1.0, 2.0, 2.0, 0.0]) == 0.5


def test_eos_rate_and_mean_length_on_hand_made_tokens():
    responses = [[5, 6, EOS], [5, 6, 7, 8], [EOS], [9, EOS, PAD, PAD]]
    assert evaluate.eos_rate(responses, EOS) == 0.75
    assert evaluate.mean_length(responses, EOS) == (3 + 4 + 1 + 2) / 4  # the EOS counts, padding after it does not
    assert evaluate.trim([9, EOS, PAD, PAD], EOS) == [9, EOS]


class Unigram(torch.nn.Module):
    """A 'language model' whose next-token distribution is the same everywhere: its log-probs are known."""

    def __init__(self, probs):
        super().__init__()
        self.log_probs = torch.nn.Parameter(torch.tensor(probs, dtype=torch.float64).log())

    def forward(self, input_ids, attention_mask=None):
        logits = self.log_probs.expand(*input_ids.shape, -1)
        return type("Output", (), {"logits": logits})()


def test_response_logprobs_are_teacher_forced_sums_over_answer_tokens_only():
    model = Unigram([0.1, 0.2, 0.3, 0.4])
    prompts = [[3, 3, 3], [2]]
    responses = [[1, 2], [3, 3, 1]]
    got = evaluate.response_logprobs(model, prompts, responses, pad_id=PAD)
    want = torch.tensor([math.log(0.2) + math.log(0.3), 2 * math.log(0.4) + math.log(0.2)], dtype=torch.float64)
    torch.testing.assert_close(got, want)


def test_kl_is_zero_against_itself_and_exact_against_a_known_reference():
    policy, reference = Unigram([0.1, 0.2, 0.3, 0.4]), Unigram([0.25, 0.25, 0.25, 0.25])
    prompts, responses = [[2], [3]], [[3, 3], [1]]
    assert evaluate.kl_divergence(policy, policy, prompts, responses, PAD) == 0.0
    want = (2 * math.log(0.4 / 0.25) + math.log(0.2 / 0.25)) / 2
    assert evaluate.kl_divergence(policy, reference, prompts, responses, PAD) == pytest.approx(want, abs=1e-12)


def test_kl_of_real_models_on_sampled_answers(trained):
    """A trained model against itself: 0; the SFT model against its random base, on its own samples: > 0."""
    from rlhf_trl.modeling import generate, render_prompt

    tokenizer = load_tokenizer(trained["sft"])
    sft, base = load_model(trained["sft"]).eval(), load_model(trained["base"]).eval()
    prompts = [[{"role": "user", "content": f"Tell me about the {s}."}] for s in ("river", "castle", "tiger")]
    sft.generation_config.do_sample, sft.generation_config.top_k = True, 0
    _, responses = generate(sft, tokenizer, prompts, max_new_tokens=12, temperature=1.0, samples=4, return_ids=True)
    prompt_ids = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"] for p in prompts]
    prompt_ids = [ids for ids in prompt_ids for _ in range(4)]
    pad = tokenizer.pad_token_id
    assert abs(evaluate.kl_divergence(sft, sft, prompt_ids, responses, pad)) < 1e-6
    assert evaluate.kl_divergence(sft, base, prompt_ids, responses, pad) > 0


def test_hacking_warning_when_reward_rises_and_truth_or_eos_falls():
    sft = {"reward_score": 0.5, "ground_truth": 0.4, "eos_rate": 0.9}
    honest = {"reward_score": 2.0, "ground_truth": 0.8, "eos_rate": 0.95}
    hacked = {"reward_score": 2.0, "ground_truth": 0.1, "eos_rate": 0.9}
    rambling = {"reward_score": 2.0, "ground_truth": None, "eos_rate": 0.4}
    assert evaluate.hacking_warnings(sft, honest) == []
    assert ["ground truth fell" in w for w in evaluate.hacking_warnings(sft, hacked)] == [True]
    assert ["end with EOS" in w for w in evaluate.hacking_warnings({**sft, "ground_truth": None}, rambling)] == [True]
    assert evaluate.hacking_warnings(sft, {**hacked, "reward_score": 0.1}) == [], "no reward rise, no hacking"


def test_each_stage_writes_its_metrics_log(trained):
    sft = read_metrics(trained["sft"])
    assert any("loss" in r for r in sft) and any("eval_loss" in r for r in sft)
    reward = read_metrics(trained["reward"])
    assert any("accuracy" in r for r in reward) and any("eval_accuracy" in r for r in reward)
    ppo = read_metrics(trained["ppo"])
    assert ppo and all(k in ppo[0] for k in ("objective/scores", "objective/kl", "objective/entropy", "loss/value_avg"))
    for records in (sft, reward, ppo):
        assert all(isinstance(r["step"], int) for r in records)
    for stage in ("sft", "reward", "ppo"):
        assert not Path(trained[stage] + ".partial").exists()


def eval_command(trained, output: Path, *extra: str):
    models = str(Path(trained["sft"]).parent)
    data = trained["data"]
    return run_module(
        "evaluate",
        "--models",
        models,
        "--prompts",
        f"{data}/prompts_eval.jsonl",
        "--pairs",
        f"{data}/pairs_eval.jsonl",
        "--max-prompts",
        "6",
        "--samples",
        "2",
        "--max-new-tokens",
        "16",
        "--output",
        str(output),
        *extra,
    )


def test_eval_prints_the_table_and_writes_json(trained, tmp_path):
    result = eval_command(trained, tmp_path / "eval.json")
    assert result.returncode == 0, result.stderr[-3000:]
    for needle in ("pairwise accuracy", "mean reward-model score", "win rate", "KL from SFT", "ground truth"):
        assert needle in result.stdout
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["prompts"] == 6 and report["samples"] == 2 and report["pairs"] == 24
    assert 0 <= report["reward_accuracy"] <= 1 and 0 <= report["stages"]["ppo"]["win_rate"] <= 1
    assert math.isfinite(report["stages"]["ppo"]["kl"]) and report["stages"]["sft"]["kl"] == 0
    assert len(report["scores"]["sft"]) == len(report["scores"]["ppo"]) == len(report["generations"]) == 12
    assert report["stages"]["sft"]["ground_truth"] is not None


def test_eval_on_a_missing_stage_says_which_make_target_to_run(world, tmp_path):
    result = run_module("evaluate", "--recipe", "demo", "--models", str(tmp_path / "nothing"))
    assert_one_line_error(result, "make sft RECIPE=demo", "first")


def test_eval_on_a_missing_ppo_output_names_make_ppo(trained, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    for stage in ("sft", "reward"):
        (models / stage).symlink_to(trained[stage])
    assert_one_line_error(run_module("evaluate", "--models", str(models)), "make ppo", "does not exist")


def test_eval_rejects_a_missing_prompts_file(trained, tmp_path):
    result = eval_command(trained, tmp_path / "eval.json", "--prompts", str(tmp_path / "no.jsonl"))
    assert_one_line_error(result, "--prompts", "does not exist")
