"""Tiny, fully offline models, tokenizers and datasets for the lorafit test-suite.

Nothing here touches the network: the tokenizer is trained in-process on a
corpus generated in code, models are randomly initialised from small configs,
and the "real size" configs (Llama 3.x 1B/8B/70B) are written from the
published shapes so tests can reason about memory without downloading weights.

Public API::

    build_tokenizer(path, *, with_chat_template=True, generation_markers=False)
        -> PreTrainedTokenizerFast
    build_sentencepiece_tokenizer(path, *, space_rule="sentencepiece") -> PreTrainedTokenizerFast
    build_tiny_model(path, arch="llama", *, with_chat_template=True, seed=0,
                     generation_markers=False, tokenizer="byte-level", **config_overrides) -> Path
    build_config_only(path, arch, size="tiny") -> Path
    write_toy_dataset(path, n=64, fmt="messages", seed=0) -> Path
    write_classification_dataset(path, n=64, seed=0, **columns) -> Path

This is a plain module (not a conftest) so it can be imported from tests,
scripts and benchmarks alike: ``from tiny_models import build_tiny_model``
(``tests/`` is put on ``sys.path`` by ``tests/conftest.py``).
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

__all__ = [
    "ARCHS",
    "BOS_TOKEN",
    "CHATML_TEMPLATE",
    "CHATML_TRAINING_TEMPLATE",
    "CLASS_WORDS",
    "CONFIG_ONLY_ARCHS",
    "DECODER_ARCHS",
    "EOS_TOKEN",
    "IM_START_TOKEN",
    "PAD_TOKEN",
    "REAL_SIZES",
    "SPECIAL_TOKENS",
    "TINY_VOCAB_SIZE",
    "TOY_FORMATS",
    "TOY_PAIRS",
    "SPM_CHAT_TEMPLATE",
    "SPM_SPECIAL_TOKENS",
    "build_config_only",
    "build_sentencepiece_tokenizer",
    "build_tiny_model",
    "build_tokenizer",
    "write_classification_dataset",
    "write_lora_run",
    "write_toy_dataset",
]

# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

PAD_TOKEN = "<|endoftext|>"  # id 0; also used as unk
IM_START_TOKEN = "<|im_start|>"  # id 1
EOS_TOKEN = "<|im_end|>"  # id 2
BOS_TOKEN = None
SPECIAL_TOKENS = [PAD_TOKEN, IM_START_TOKEN, EOS_TOKEN]
TINY_VOCAB_SIZE = 512

# Standard ChatML, identical in shape to SmolLM2/Qwen-style templates (minus system defaults).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Same rendering as CHATML_TEMPLATE, but assistant turns are wrapped in {% generation %} markers
# (content + <|im_end|>) so `return_assistant_tokens_mask=True` / TRL `assistant_only_loss=True` work.
CHATML_TRAINING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Toy task: colour word -> fixed object word.
TOY_PAIRS: dict[str, str] = {
    "red": "apple",
    "blue": "sky",
    "green": "grass",
    "yellow": "banana",
    "white": "snow",
    "black": "night",
}
TOY_FORMATS = ("messages", "alpaca", "prompt-completion", "text")
TOY_INSTRUCTION = "Name the thing that has this color."

_CORPUS_WORDS = (
    # toy task + prompts used in the tests
    list(TOY_PAIRS) + list(TOY_PAIRS.values())
    + "name the thing that has this color reverse order of these words answer question "
    "user assistant system instruction input output prompt completion text color thing".split()
    # common English
    + "a an and are as at be but by can do for from go has have he her his how i if in is it "
    "its just like make me more my no not now of on one or our out so some than then there "
    "they this to up us was we what when where which who will with would you your yes hello "
    "world good day night time year people way man woman child house water fire earth air "
    "stone river cloud tree bird fish dog cat horse cow book door table chair window road city "
    "town music song word number list train test model data learn small large fast slow happy "
    "sad open close start stop left right first last next new old hot cold light dark sun moon "
    "star rain wind sea ship boat car bus bread milk cheese egg cake tea coffee sugar salt "
    "paper pen king queen garden flower leaf seed box key lamp bell ring coin gold silver "
    "orange purple pink brown gray".split()
)


def _corpus_lines(n_lines: int = 600, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    words = _CORPUS_WORDS
    punct = [".", ",", "!", "?", ":", ";", "-", "'", '"', "(", ")"]
    lines: list[str] = []
    for i in range(n_lines):
        kind = i % 6
        if kind == 0:  # plain sentence
            ws = rng.choices(words, k=rng.randint(4, 12))
            line = " ".join(ws).capitalize() + rng.choice([".", "!", "?"])
        elif kind == 1:  # digits and arithmetic
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            line = f"{a} + {b} = {a + b}, {rng.randint(0, 99999)} {rng.random():.3f}"
        elif kind == 2:  # toy task
            c = rng.choice(list(TOY_PAIRS))
            line = f"{TOY_INSTRUCTION} {c} -> {TOY_PAIRS[c]}. Color: {c}\nThing: {TOY_PAIRS[c]}"
        elif kind == 3:  # reverse words task
            ws = rng.sample(words, 4)
            line = f"Reverse the order of these words: {' '.join(ws)}\n{' '.join(reversed(ws))}"
        elif kind == 4:  # punctuation soup
            ws = rng.choices(words, k=6)
            line = " ".join(w + rng.choice(punct) for w in ws)
        else:  # chat-like lines
            c = rng.choice(words)
            line = f"user\n{c} {rng.choice(words)}\nassistant\n{rng.choice(words).upper()} {c}."
        lines.append(line)
    return lines


@functools.lru_cache(maxsize=1)
def _trained_tokenizer_json(vocab_size: int = TINY_VOCAB_SIZE) -> str:
    """Train the byte-level BPE once per process and return its JSON serialisation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps offsets exact, needed for return_assistant_tokens_mask / offsets.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok.to_str()


def _make_hf_tokenizer(*, with_chat_template: bool = True, generation_markers: bool = False):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast  # alias of TokenizersBackend in transformers 5

    backend = Tokenizer.from_str(_trained_tokenizer_json())
    template = None
    if with_chat_template:
        template = CHATML_TRAINING_TEMPLATE if generation_markers else CHATML_TEMPLATE
    kwargs: dict[str, Any] = {}
    if template is not None:
        kwargs["chat_template"] = template
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=PAD_TOKEN,
        bos_token=None,
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        **kwargs,
    )


def build_tokenizer(
    path: Path | str,
    *,
    with_chat_template: bool = True,
    generation_markers: bool = False,
):
    """Train a tiny byte-level BPE (vocab 512), wrap it, save it to ``path`` and return it.

    Special tokens: ``<|endoftext|>`` (id 0, pad+unk), ``<|im_start|>`` (1), ``<|im_end|>`` (2, eos).
    No BOS. ``with_chat_template=False`` saves no chat template at all (``tokenizer.chat_template is None``).
    ``generation_markers=True`` uses :data:`CHATML_TRAINING_TEMPLATE` (same text, plus
    ``{% generation %}`` markers so assistant-only loss masking works).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _make_hf_tokenizer(with_chat_template=with_chat_template, generation_markers=generation_markers)
    tok.save_pretrained(str(path))
    return tok


# SentencePiece-style tokenizer (Llama 2, Mistral 7B v0.x): BPE over "▁"-marked words with byte fallback.
SPM_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2; then <0x00>..<0xFF> at ids 3..258, as in Llama 2
SPM_VOCAB_SIZE = 768
# Mistral-7B-Instruct-v0.1's shape: BOS written by the template, no generation prompt, EOS after each answer.
SPM_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
_SPACE_RULES = ("sentencepiece", "metaspace-first")


@functools.lru_cache(maxsize=2)
def _sentencepiece_tokenizer_json(space_rule: str) -> str:
    """A Llama-2-shaped tokenizer.json: the vocabulary trained here, merges for every pair of tokens whose
    concatenation is a token, ordered by that token's id (what transformers' SentencePiece converter writes for
    Llama 2), byte fallback to <0xNN> tokens, and BOS added to every text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers.tokenization_utils_base import generate_merges

    byte_tokens = [f"<0x{byte:02X}>" for byte in range(256)]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=SPM_VOCAB_SIZE, min_frequency=2, show_progress=False,
                                  special_tokens=SPM_SPECIAL_TOKENS + byte_tokens)
    trainer_tok.train_from_iterator(_corpus_lines(), trainer=trainer)
    vocab = json.loads(trainer_tok.to_str())["model"]["vocab"]
    merges = generate_merges(vocab, {token: -index for token, index in vocab.items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens(SPM_SPECIAL_TOKENS)  # the byte tokens stay plain vocabulary, as in Llama 2
    if space_rule == "sentencepiece":  # Llama 2's and Mistral v0.1's tokenizer.json
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:  # what transformers 5's LlamaTokenizer builds (legacy=False)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok.to_str()


def build_sentencepiece_tokenizer(path: Path | str, *, space_rule: str = "sentencepiece",
                                  with_chat_template: bool = True):
    """Build a tiny Llama-2-style SentencePiece BPE tokenizer (vocab 768), save it to ``path`` and return it.

    ``<unk>`` 0, ``<s>`` 1 (added to every text), ``</s>`` 2 (eos), ``<0x00>``..``<0xFF>`` 3..258; characters the
    ASCII training corpus never saw fall back to byte tokens. ``space_rule`` "sentencepiece": "▁" before every text
    segment (Llama 2's tokenizer.json normalizer); "metaspace-first": only at the start of the text (transformers 5's
    Metaspace). Chat template: :data:`SPM_CHAT_TEMPLATE`.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if space_rule not in _SPACE_RULES:
        raise ValueError(f"unknown space_rule {space_rule!r}; expected one of {_SPACE_RULES}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_sentencepiece_tokenizer_json(space_rule)), bos_token="<s>",
        eos_token="</s>", unk_token="<unk>", pad_token=None, model_max_length=512, clean_up_tokenization_spaces=False,
        **({"chat_template": SPM_CHAT_TEMPLATE} if with_chat_template else {}))
    tok.save_pretrained(str(path))
    return tok


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------

DECODER_ARCHS = ("llama", "qwen2", "gpt2", "mistral")
ARCHS = DECODER_ARCHS + ("bert",)
CONFIG_ONLY_ARCHS = ("llama", "qwen2", "gpt2", "mistral", "gemma", "phi3", "bert")

_TINY = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128, "max_pos": 512}


def _tiny_config(arch: str, vocab_size: int, *, pad_id: int = 0, eos_id: int = 2, bos_id: int | None = None):
    """A small randomly-initialisable config for ``arch`` (transformers 5 config classes)."""
    import transformers as tf

    h, L, nh, kv, ff, mp = (_TINY[k] for k in ("hidden", "layers", "heads", "kv_heads", "intermediate", "max_pos"))
    # initializer_range 0.02 (the default) gives a 64-wide model logits of at most ~1 after the final norm, so
    # LoRA alone could never make it confident; real models' embeddings are far larger. 0.2 keeps tests learnable.
    common = dict(vocab_size=vocab_size, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=bos_id,
                  initializer_range=0.2)
    if arch == "llama":
        return tf.LlamaConfig(
            hidden_size=h, num_hidden_layers=L, num_attention_heads=nh, num_key_value_heads=kv,
            intermediate_size=ff, max_position_embeddings=mp, tie_word_embeddings=False, **common,
        )
    if arch == "qwen2":
        return tf.Qwen2Config(
            hidden_size=h, num_hidden_layers=L, num_attention_heads=nh, num_key_value_heads=kv,
            intermediate_size=ff, max_position_embeddings=mp, tie_word_embeddings=True,
            max_window_layers=L, **common,
        )
    if arch == "mistral":
        return tf.MistralConfig(
            hidden_size=h, num_hidden_layers=L, num_attention_heads=nh, num_key_value_heads=kv,
            intermediate_size=ff, max_position_embeddings=mp, sliding_window=None,
            tie_word_embeddings=False, **common,
        )
    if arch == "gemma":
        return tf.GemmaConfig(
            hidden_size=h, num_hidden_layers=L, num_attention_heads=nh, num_key_value_heads=kv,
            head_dim=h // nh, intermediate_size=ff, max_position_embeddings=mp, **common,
        )
    if arch == "phi3":
        return tf.Phi3Config(
            hidden_size=h, num_hidden_layers=L, num_attention_heads=nh, num_key_value_heads=kv,
            intermediate_size=ff, max_position_embeddings=mp, original_max_position_embeddings=mp,
            **common,
        )
    if arch == "gpt2":
        return tf.GPT2Config(
            n_embd=h, n_layer=L, n_head=nh, n_inner=ff, n_positions=mp, **common,
        )
    if arch == "bert":
        # No dropout (BERT's default is 0.1, the decoders' 0): in a 64-wide model it drowns what LoRA learns in a
        # few dozen steps, and without it the tiny classifier learns tests/test_classification.py's toy task.
        return tf.BertConfig(
            hidden_size=h, num_hidden_layers=L, num_attention_heads=nh, intermediate_size=ff,
            max_position_embeddings=mp, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
            **common,
        )
    raise ValueError(f"unknown arch {arch!r}; expected one of {CONFIG_ONLY_ARCHS}")


def build_tiny_model(
    path: Path | str,
    arch: str = "llama",
    *,
    with_chat_template: bool = True,
    seed: int = 0,
    generation_markers: bool = False,
    tokenizer: str = "byte-level",
    **config_overrides: Any,
) -> Path:
    """Build a random tiny model + tokenizer and save both (safetensors) into ``path``.

    ``arch`` in ``{"llama", "qwen2", "gpt2", "mistral"}`` -> ``*ForCausalLM``;
    ``"bert"`` -> ``BertForSequenceClassification`` (num_labels=2).
    2 layers, hidden 64, 4 heads (2 KV heads where supported), intermediate 128,
    512 positions, vocab = tokenizer size (512). ``config_overrides`` are set on the config
    before the model is instantiated (e.g. ``tie_word_embeddings=True``). ``tokenizer``: "byte-level"
    (:func:`build_tokenizer`), or "sentencepiece" / "metaspace-first" (:func:`build_sentencepiece_tokenizer`, vocab
    768, BOS ``<s>``). Returns ``path``.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    import torch
    import transformers as tf
    from transformers import GenerationConfig

    path = Path(path)
    if tokenizer == "byte-level":
        tok = build_tokenizer(path, with_chat_template=with_chat_template, generation_markers=generation_markers)
    else:
        tok = build_sentencepiece_tokenizer(path, space_rule=tokenizer, with_chat_template=with_chat_template)
    config = _tiny_config(arch, len(tok), pad_id=tok.pad_token_id, eos_id=tok.eos_token_id, bos_id=tok.bos_token_id)
    for k, v in config_overrides.items():
        setattr(config, k, v)

    cls = {
        "llama": tf.LlamaForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
        "mistral": tf.MistralForCausalLM,
        "gpt2": tf.GPT2LMHeadModel,
        "bert": tf.BertForSequenceClassification,
    }[arch]
    torch.manual_seed(seed)
    model = cls(config)
    model.eval()
    if arch != "bert":
        model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            do_sample=False,
            max_new_tokens=16,
        )
    model.save_pretrained(str(path))  # transformers 5 always writes model.safetensors
    return path


# --------------------------------------------------------------------------------------
# Config-only folders (no weights), including real published shapes
# --------------------------------------------------------------------------------------

_LLAMA3_COMMON: dict[str, Any] = dict(
    vocab_size=128256,
    hidden_act="silu",
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    bos_token_id=128000,
    eos_token_id=128001,
    attention_bias=False,
    mlp_bias=False,
    head_dim=None,  # filled below
    initializer_range=0.02,
)

# Published shapes (meta-llama/Llama-3.2-1B, Llama-3.1-8B, Llama-3.1-70B config.json).
REAL_SIZES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    "llama-3.1-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    "llama-70b": dict(  # Llama-3.1-70B / Llama-3.3-70B
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
}
# Parameter counts of the published models (for tests): 1,235,814,400 / 8,030,261,248 / 70,553,706,496.
REAL_PARAM_COUNTS = {"llama-3.2-1b": 1_235_814_400, "llama-3.1-8b": 8_030_261_248, "llama-70b": 70_553_706_496}
_SIZE_ALIASES = {"llama-3.1-70b": "llama-70b", "llama-3.3-70b": "llama-70b", "llama-3-70b": "llama-70b"}


def build_config_only(path: Path | str, arch: str, size: str = "tiny") -> Path:
    """Write only ``config.json`` (no weights, no tokenizer) into ``path`` and return ``path``.

    ``size="tiny"``: the same tiny shapes as :func:`build_tiny_model` (vocab 512) for any arch in
    ``{"llama", "qwen2", "gpt2", "mistral", "gemma", "phi3", "bert"}``.
    ``size in {"llama-3.2-1b", "llama-3.1-8b", "llama-70b"}``: the published Llama 3.x shapes
    (vocab 128256, bf16); only valid with ``arch="llama"``.
    """
    size = _SIZE_ALIASES.get(size.lower(), size.lower())
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if size == "tiny":
        config = _tiny_config(arch, TINY_VOCAB_SIZE)
    elif size in REAL_SIZES:
        if arch != "llama":
            raise ValueError(f"size {size!r} is a Llama shape; use arch='llama' (got {arch!r})")
        from transformers import LlamaConfig

        config = LlamaConfig(**{**_LLAMA3_COMMON, **REAL_SIZES[size]})
        config.dtype = "bfloat16"
    else:
        raise ValueError(f"unknown size {size!r}; expected 'tiny' or one of {sorted(REAL_SIZES)}")
    arch_names = {
        "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "gpt2": "GPT2LMHeadModel",
        "mistral": "MistralForCausalLM", "gemma": "GemmaForCausalLM", "phi3": "Phi3ForCausalLM",
        "bert": "BertForSequenceClassification",
    }
    config.architectures = [arch_names[arch]]
    config.save_pretrained(str(path))
    return path


# --------------------------------------------------------------------------------------
# Toy dataset
# --------------------------------------------------------------------------------------


def _toy_record(color: str, answer: str, fmt: str) -> dict[str, Any]:
    if fmt == "messages":
        return {"messages": [{"role": "user", "content": color}, {"role": "assistant", "content": answer}]}
    if fmt == "alpaca":
        return {"instruction": TOY_INSTRUCTION, "input": color, "output": answer}
    if fmt == "prompt-completion":
        return {"prompt": f"Color: {color}\nThing:", "completion": f" {answer}"}
    if fmt == "text":
        return {"text": f"Color: {color}\nThing: {answer}"}
    raise ValueError(f"unknown fmt {fmt!r}; expected one of {TOY_FORMATS}")


def write_toy_dataset(path: Path | str, n: int = 64, fmt: str = "messages", seed: int = 0) -> Path:
    """Write ``n`` jsonl rows of the colour->thing toy task (see :data:`TOY_PAIRS`) to ``path``.

    Formats: ``messages`` ({"messages": [user, assistant]}), ``alpaca`` ({"instruction","input","output"}),
    ``prompt-completion`` ({"prompt","completion"}), ``text`` ({"text"}). Rows cycle through every
    pair (so every pair appears once n >= 6) in a seeded shuffled order. Returns ``path``.
    """
    if fmt not in TOY_FORMATS:
        raise ValueError(f"unknown fmt {fmt!r}; expected one of {TOY_FORMATS}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    colors = list(TOY_PAIRS)
    rows = [colors[i % len(colors)] for i in range(n)]
    rng.shuffle(rows)
    with path.open("w", encoding="utf-8") as f:
        for c in rows:
            f.write(json.dumps(_toy_record(c, TOY_PAIRS[c], fmt)) + "\n")
    return path


# Sequence-classification toy task: a row's words come from its class's topic (plus filler words anywhere),
# so the class is visible at every position: the first token a BERT-style model pools and the last token a decoder
# classifier reads. A tiny random model with LoRA and a trained head learns it in a few dozen steps.
CLASS_WORDS: dict[str, tuple[str, ...]] = {
    "animal": ("dog", "cat", "horse", "cow", "bird", "fish"),
    "food": ("bread", "milk", "cheese", "egg", "cake", "tea"),
}
_FILLER_WORDS = ("the", "a", "and", "of", "with", "my")


def write_classification_dataset(
    path: Path | str,
    n: int = 64,
    seed: int = 0,
    *,
    text: str = "text",
    label: str = "label",
    extra_rows: tuple[dict[str, Any], ...] = (),
) -> Path:
    """Write ``n`` jsonl rows ``{text: "...", label: "animal" | "food"}`` (classes alternate, see :data:`CLASS_WORDS`):
    three topic words and two filler words in a seeded shuffled order. ``text`` / ``label`` rename the columns;
    ``extra_rows`` are appended as they are (e.g. a row with an unknown label). Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    classes = list(CLASS_WORDS)
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            name = classes[i % len(classes)]
            words = rng.choices(CLASS_WORDS[name], k=3) + rng.sample(_FILLER_WORDS, 2)
            rng.shuffle(words)
            f.write(json.dumps({text: " ".join(words), label: name}) + "\n")
        for row in extra_rows:
            f.write(json.dumps(row) + "\n")
    return path


# --------------------------------------------------------------------------------------
# Run folders with an (untrained) adapter, for merge / eval tests that do not need learning
# --------------------------------------------------------------------------------------


def write_lora_run(
    path: Path | str,
    base: Path | str,
    *,
    r: int = 4,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    quantization: dict[str, Any] | None = None,
) -> Path:
    """Write a run folder shaped like ``lorafit train``'s (``adapter/`` + ``recipe.yaml`` + toy data)
    holding a random, non-zero LoRA adapter for ``base`` (no training: ~1 s). Returns the adapter folder.

    ``quantization`` (e.g. ``{"bits": 4}``) is recorded in the recipe, as for a QLoRA run; the adapter
    tensors of a QLoRA run have the same shapes as a LoRA run's.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, base = Path(path), Path(base)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules), init_lora_weights=False,
                        lora_dropout=0.0, task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(str(path / "adapter"))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(path / "adapter"))
    data = write_toy_dataset(path / "toy.jsonl", n=12, seed=seed)
    recipe: dict[str, Any] = {
        "name": path.name,
        "model": {"path": str(base)},
        "adapter": {"r": r, "alpha": 2 * r, "dropout": 0.0, "target_modules": list(target_modules)},
        "data": {"train": str(data), "eval": str(data), "max_length": 64},
        # Pinned: merge rebuilds the QLoRA reference at the recipe's precision, and `auto` is bf16 on a CPU with
        # native bf16; the tests compare against fp32 references.
        "training": {"precision": "fp32"},
        "output": {"dir": str(path), "report_to": ["none"]},
    }
    if quantization is not None:
        recipe["quantization"] = quantization
    (path / "recipe.yaml").write_text(json.dumps(recipe, indent=2), encoding="utf-8")  # JSON is valid YAML
    return path / "adapter"
