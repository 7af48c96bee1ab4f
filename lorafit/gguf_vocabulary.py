"""The tokenizer inside a GGUF file, written the way llama.cpp's convert_hf_to_gguf.py writes it.

`describe_vocabulary` says which of llama.cpp's two BPE vocabulary types a tokenizer is, and refuses the others before
any work; `write_vocabulary` writes it; `as_llama_cpp_splits` gives the training tokenizer with llama.cpp's rule for
splitting text, which the verification compares token ids against.

- Byte-level BPE (Llama 3, SmolLM, Qwen2/3, Mistral Nemo): `tokenizer.ggml.model = "gpt2"` with the merges and the
  name of the split regex (`tokenizer.ggml.pre`), which llama.cpp picks its pre-tokenizer by.
- SentencePiece-style BPE (Llama 2, Mistral 7B v0.x: a tokenizer.json BPE with byte fallback, `<0xNN>` byte tokens and
  a "▁" word marker): `tokenizer.ggml.model = "llama"` with a score per token and no merges. llama.cpp's SentencePiece
  tokenizer merges the adjacent pair whose result scores highest, so the scores carry the merge order: a token scores
  minus the rank of the first merge that makes it. (gguf-py's LlamaHfVocab gives every token -1000, which makes
  llama.cpp merge left to right instead; its SentencePieceVocab needs a tokenizer.model that transformers 5 does not
  save. The token types follow SentencePieceVocab: UNKNOWN, CONTROL, USER_DEFINED, BYTE, NORMAL.)
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorafit.errors import LorafitError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# llama.cpp picks its pre-tokenizer (the regex that splits text before BPE) by name. These are the split patterns
# the tokenizer.json files of the supported families carry, and the names llama.cpp gives them (llama-vocab.cpp).
SPLIT_PATTERNS = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
    r"|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
    r"|\s+": "qwen2",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}"
    r"\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+": "tekken",
}
SUPPORTED = ("byte-level BPE (Llama 3, SmolLM, Qwen2/3, Mistral Nemo) and SentencePiece-style BPE with byte fallback "
             "(Llama 2, Mistral 7B v0.x)")
_WORD_MARK = "\u2581"  # SentencePiece's "▁": a space, and the start of a word
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_ADDED_SCORE = -1000.0  # what convert_hf_to_gguf.py gives added and padding tokens


@dataclass
class Vocabulary:
    """Which llama.cpp vocabulary a tokenizer is written as."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE)
    pre: str  # tokenizer.ggml.pre: the split regex's name, "default" for SentencePiece-style
    space_prefix: bool = False  # "llama": llama.cpp puts "▁" before each text segment (tokenizer.ggml.add_space_prefix)
    # "llama": how the training tokenizer adds that "▁": "sentencepiece" (before every segment, as llama.cpp does),
    # "metaspace-first" / "metaspace-always" (transformers' Metaspace: not before a segment that starts with a
    # space; "first": only at the start of the text), or "none".
    prefix_rule: str = "none"

    @property
    def splits_like_training(self) -> bool:
        """Whether llama.cpp's splitting rule is exactly the training tokenizer's."""
        return self.prefix_rule in ("sentencepiece", "none")


def describe_vocabulary(tokenizer: PreTrainedTokenizerBase) -> Vocabulary:
    """The llama.cpp vocabulary type of this tokenizer; refuses the ones llama.cpp has no faithful equivalent for."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    pre_steps = _steps(spec.get("pre_tokenizer"))
    kinds = [step.get("type") for step in pre_steps]
    if model.get("type") == "BPE" and "ByteLevel" in kinds:
        return Vocabulary("gpt2", _split_name(pre_steps, kinds))
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return _sentencepiece_vocabulary(spec, pre_steps)
    what = f"a {model.get('type')} tokenizer" if model.get("type") else "a slow (Python) tokenizer"
    raise LorafitError(f"GGUF export supports {SUPPORTED}; this model has {what}", where="--format gguf",
                       hint="export with --format safetensors and convert with llama.cpp's convert_hf_to_gguf.py")


def _steps(part: dict | None) -> list[dict]:
    part = part or {}
    key = "pretokenizers" if "pretokenizers" in part else "normalizers"
    return part.get(key, [part]) if part.get("type") == "Sequence" else ([part] if part else [])


def _split_name(steps: list[dict], kinds: list[str]) -> str:
    byte_level = steps[kinds.index("ByteLevel")]
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern in SPLIT_PATTERNS:
            return SPLIT_PATTERNS[pattern]
    raise LorafitError(f"the tokenizer splits text in a way llama.cpp has no name for ({' + '.join(map(str, kinds))})",
                       where="--format gguf",
                       hint="export with --format safetensors and convert with llama.cpp's convert_hf_to_gguf.py")


def _sentencepiece_vocabulary(spec: dict, pre_steps: list[dict]) -> Vocabulary:
    """A BPE with byte fallback counts as SentencePiece-style when spaces become "▁" the way llama.cpp does it:
    Llama 2's tokenizer.json normalizer (Prepend "▁", Replace " " -> "▁"), or transformers' Metaspace pre-tokenizer."""
    normalizer = [(step.get("type"), step.get("prepend"), (step.get("pattern") or {}).get("String"),
                   step.get("content")) for step in _steps(spec.get("normalizer"))]
    replace = ("Replace", None, " ", _WORD_MARK)
    if not pre_steps and normalizer == [("Prepend", _WORD_MARK, None, None), replace]:
        return Vocabulary("llama", "default", space_prefix=True, prefix_rule="sentencepiece")
    if not pre_steps and normalizer == [replace]:
        return Vocabulary("llama", "default", space_prefix=False, prefix_rule="none")
    if not normalizer and [step.get("type") for step in pre_steps] == ["Metaspace"]:
        metaspace = pre_steps[0]
        scheme = metaspace.get("prepend_scheme", "always" if metaspace.get("add_prefix_space", True) else "never")
        if metaspace.get("replacement", _WORD_MARK) == _WORD_MARK and scheme in ("first", "always", "never"):
            rule = "none" if scheme == "never" else f"metaspace-{scheme}"
            return Vocabulary("llama", "default", space_prefix=scheme != "never", prefix_rule=rule)
    raise LorafitError(f"GGUF export supports {SUPPORTED}; this model's byte-fallback BPE tokenizer turns spaces into "
                       "tokens in a way llama.cpp's SentencePiece tokenizer does not reproduce", where="--format gguf",
                       hint="export with --format safetensors and convert with llama.cpp's convert_hf_to_gguf.py")


def write_vocabulary(writer, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> Vocabulary:
    """Tokens, token types (and scores or merges), special ids, BOS/EOS flags and the chat template."""
    vocabulary = describe_vocabulary(tokenizer)
    reverse = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(reverse) >= vocab_size:
        raise LorafitError(f"the tokenizer has {max(reverse) + 1} tokens but the model's vocabulary only "
                           f"{vocab_size}", where="tokenizer", hint="resize the model's embeddings to the tokenizer")
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model(vocabulary.model)
    writer.add_tokenizer_pre(vocabulary.pre)
    if vocabulary.model == "gpt2":
        tokens, types = _byte_level_tokens(tokenizer, reverse, vocab_size)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(_merges(merges))
    else:
        tokens, scores, types = _sentencepiece_tokens(tokenizer, reverse, vocab_size, merges)
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(vocabulary.space_prefix)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    return vocabulary


def _looks_special(text: str) -> bool:
    # convert_hf_to_gguf.py's does_token_look_special: added tokens like <|im_end|> are control tokens even when the
    # tokenizer does not mark them special.
    return text.startswith("<|") and text.endswith("|>")


def _byte_level_tokens(tokenizer, reverse: dict[int, str], vocab_size: int) -> tuple[list[str], list[int]]:
    import gguf

    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in reverse:  # the embedding matrix is padded past the tokenizer
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            token = added[index]
            tokens.append(token.content)  # llama.cpp matches added tokens as raw text
            special = token.special or _looks_special(token.content)
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[index])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _sentencepiece_tokens(tokenizer, reverse: dict[int, str], vocab_size: int,
                          merges: list) -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, types) as llama.cpp's SentencePiece tokenizer reads them (see the module docstring)."""
    import gguf

    made_by = {}  # token -> rank of the first merge that makes it
    for rank, pair in enumerate(merges):
        left, right = pair if isinstance(pair, list) else pair.split(" ", 1)
        made_by.setdefault(left + right, rank)
    unmerged = -float(len(merges) + 1)  # single characters: never the result of a merge, so never compared
    added = tokenizer.added_tokens_decoder
    tokens, scores, types = [], [], []
    for index in range(vocab_size):
        if index not in reverse:
            tokens.append(f"[PAD{index}]")
            scores.append(_ADDED_SCORE)
            types.append(gguf.TokenType.UNUSED)
        elif index == tokenizer.unk_token_id:
            tokens.append(reverse[index])
            scores.append(0.0)
            types.append(gguf.TokenType.UNKNOWN)
        elif index in added:
            token = added[index]
            if token.special or _looks_special(token.content):
                tokens.append(token.content)
                scores.append(0.0)
                types.append(gguf.TokenType.CONTROL)
            else:  # llama.cpp matches user-defined tokens in the raw text, before spaces become "▁"
                tokens.append(token.content.replace(_WORD_MARK, " "))
                scores.append(_ADDED_SCORE)
                types.append(gguf.TokenType.USER_DEFINED)
        elif _BYTE_TOKEN.fullmatch(reverse[index]):
            tokens.append(reverse[index])
            scores.append(0.0)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(reverse[index])
            scores.append(-float(made_by[reverse[index]]) if reverse[index] in made_by else unmerged)
            types.append(gguf.TokenType.NORMAL)
    return tokens, scores, types


def _merges(merges: list) -> list[str]:
    """tokenizer.json merges ("a b" strings, or [a, b] pairs since tokenizers 0.20) as llama.cpp reads them."""
    if merges and isinstance(merges[0], list):
        # A pair may contain spaces; llama.cpp splits on the first space, so spaces are shifted as gguf-py does.
        return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                for pair in merges]
    return list(merges)


def as_llama_cpp_splits(tokenizer: PreTrainedTokenizerBase, vocabulary: Vocabulary) -> PreTrainedTokenizerBase:
    """The training tokenizer splitting text as llama.cpp will: the tokenizer itself where the rules are the same;
    for a Metaspace tokenizer, a copy with SentencePiece's rule ("▁" before every text segment, also one that starts
    with a space or follows a special token), which is the only one llama.cpp has."""
    if vocabulary.model != "llama" or vocabulary.splits_like_training:
        return tokenizer
    from tokenizers import normalizers

    twin = copy.deepcopy(tokenizer)
    twin.backend_tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend(_WORD_MARK), normalizers.Replace(" ", _WORD_MARK)])
    twin.backend_tokenizer.pre_tokenizer = None
    return twin
