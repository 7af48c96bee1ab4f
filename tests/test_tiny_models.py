"""Fast checks that the offline test builders in tests/tiny_models.py work."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from tiny_models import (
    CONFIG_ONLY_ARCHS,
    DECODER_ARCHS,
    REAL_PARAM_COUNTS,
    TINY_VOCAB_SIZE,
    TOY_FORMATS,
    TOY_PAIRS,
    build_config_only,
    build_tokenizer,
    write_toy_dataset,
)

CHAT = [{"role": "user", "content": "red"}, {"role": "assistant", "content": "apple"}]


def test_tokenizer_round_trip_and_specials(tmp_path):
    tok = build_tokenizer(tmp_path)
    assert len(tok) == TINY_VOCAB_SIZE
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.bos_token) == (0, 2, 0, None)
    text = "Reverse the order of these words: apple river stone cloud. 123, 4567! Zürich ✓"
    ids = tok(text)["input_ids"]
    assert 0 not in ids  # byte-level: nothing is unknown
    assert tok.decode(ids) == text
    # reloads through the Auto API from disk, identical ids
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(text)["input_ids"] == ids
    assert reloaded.eos_token == "<|im_end|>" and reloaded.pad_token == "<|endoftext|>"


def test_chat_template_renders(tmp_path):
    build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.apply_chat_template(CHAT, tokenize=False) == (
        "<|im_start|>user\nred<|im_end|>\n<|im_start|>assistant\napple<|im_end|>\n"
    )
    assert tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nred<|im_end|>\n<|im_start|>assistant\n"
    )
    # transformers 5: tokenize=True returns a BatchEncoding by default (return_dict=True)
    ids = tok.apply_chat_template(CHAT, return_dict=False)
    assert ids[0] == 1 and ids.count(2) == 2


def test_tokenizer_without_chat_template(tmp_path):
    build_tokenizer(tmp_path, with_chat_template=False)
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template is None


def test_generation_markers_template_masks_assistant(tmp_path):
    plain = build_tokenizer(tmp_path / "plain")
    tok = build_tokenizer(tmp_path / "gen", generation_markers=True)
    assert tok.apply_chat_template(CHAT, tokenize=False) == plain.apply_chat_template(CHAT, tokenize=False)
    enc = tok.apply_chat_template(CHAT, return_assistant_tokens_mask=True)
    masked = [i for i, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(masked) == "apple<|im_end|>"


@pytest.mark.parametrize("arch", DECODER_ARCHS)
def test_decoder_archs_load_and_forward(tiny_model_factory, arch):
    path = tiny_model_factory(arch)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id == 2
    assert model.config.pad_token_id == tok.pad_token_id == 0
    assert model.generation_config.eos_token_id == 2 and model.generation_config.pad_token_id == 0
    assert (path / "model.safetensors").exists()
    batch = tok(["red apple", "blue"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(out.loss)
    enc = tok.apply_chat_template(CHAT[:1], add_generation_prompt=True, return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] <= enc["input_ids"].shape[1] + 3


def test_tiny_llama_fixture_is_deterministic(tiny_llama, tiny_model_factory):
    a = AutoModelForCausalLM.from_pretrained(tiny_llama)
    b = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama", seed=0))
    c = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama", seed=1))
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_bert_sequence_classification(tiny_model_factory):
    path = tiny_model_factory("bert")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    assert model.config.num_labels == 2
    batch = tok(["red apple", "blue"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, 2) and torch.isfinite(out.loss)


@pytest.mark.parametrize("arch", CONFIG_ONLY_ARCHS)
def test_config_only_tiny(tmp_path, arch):
    path = build_config_only(tmp_path, arch)
    assert sorted(p.name for p in path.iterdir()) == ["config.json"]
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == arch and cfg.vocab_size == TINY_VOCAB_SIZE
    auto = AutoModelForSequenceClassification if arch == "bert" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


@pytest.mark.parametrize(
    "size,hidden,layers,heads,kv,inter,tied",
    [
        ("llama-3.2-1b", 2048, 16, 32, 8, 8192, True),
        ("llama-3.1-8b", 4096, 32, 32, 8, 14336, False),
        ("llama-70b", 8192, 80, 64, 8, 28672, False),
    ],
)
def test_config_only_real_llama_shapes(tmp_path, size, hidden, layers, heads, kv, inter, tied):
    path = build_config_only(tmp_path, "llama", size)
    assert not (path / "model.safetensors").exists()
    cfg = AutoConfig.from_pretrained(path)
    got = (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
           cfg.intermediate_size, cfg.tie_word_embeddings, cfg.vocab_size)
    assert got == (hidden, layers, heads, kv, inter, tied, 128256)
    if size == "llama-3.2-1b":
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        n = sum(p.numel() for p in model.parameters())
        assert n == REAL_PARAM_COUNTS[size]
        assert 1.23e9 < n < 1.25e9


def test_config_only_rejects_unknown(tmp_path):
    with pytest.raises(ValueError):
        build_config_only(tmp_path, "llama", "llama-13q")
    with pytest.raises(ValueError):
        build_config_only(tmp_path, "gpt2", "llama-3.2-1b")


@pytest.mark.parametrize("fmt", TOY_FORMATS)
def test_toy_dataset_formats(toy_data_factory, fmt):
    path = toy_data_factory(fmt, n=30, seed=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 30
    expected_keys = {
        "messages": {"messages"},
        "alpaca": {"instruction", "input", "output"},
        "prompt-completion": {"prompt", "completion"},
        "text": {"text"},
    }[fmt]
    assert all(set(r) == expected_keys for r in rows)
    assert path.read_text() == write_toy_dataset(path.with_name("again.jsonl"), 30, fmt, 3).read_text()


def test_toy_data_fixture(toy_data):
    rows = [json.loads(line) for line in toy_data.read_text().splitlines()]
    assert len(rows) == 64
    for r in rows:
        user, assistant = r["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert TOY_PAIRS[user["content"]] == assistant["content"]
    assert {r["messages"][0]["content"] for r in rows} == set(TOY_PAIRS)
