"""Tiny assets the tests build offline: an encoder (BERT-style WordPiece) tokenizer and model configs."""

from pathlib import Path


def build_encoder_tokenizer(texts: list[str], vocab_size: int = 400):
    """A lowercase WordPiece tokenizer with [CLS]/[SEP] pair templates, as DistilBERT's is."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=128,
    )


def build_gpt2(tokenizer, path: Path, seed: int = 0) -> Path:
    """A randomly initialised 2-layer GPT-2 sharing `tokenizer`, saved with it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=128,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def distilbert_classifier(tokenizer, max_positions: int = 128):
    """A randomly initialised 1-layer DistilBERT sequence classifier (one score) for `tokenizer`, unsaved."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(
        vocab_size=len(tokenizer),
        dim=32,
        n_layers=1,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
    )
    return DistilBertForSequenceClassification(config)


def build_distilbert(tokenizer, path: Path, seed: int = 0) -> Path:
    """`distilbert_classifier` with 128 positions, seeded, saved with `tokenizer`."""
    import torch

    torch.manual_seed(seed)
    distilbert_classifier(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
