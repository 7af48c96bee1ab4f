"""`lorafit merge --format gguf`: the merged model as one GGUF file for llama.cpp, Ollama and LM Studio, proven to
behave like the model that was trained before it is called done.

`export_gguf` is the one entry point. It writes `model.gguf` the way llama.cpp's own convert_hf_to_gguf.py writes
the Llama family (Llama 2/3, SmolLM, Mistral) and Qwen2/Qwen3 -- hyperparameters, RoPE, the vocabulary (byte-level or
SentencePiece-style BPE: lorafit.gguf_vocabulary), special token ids and the training chat template -- plus an Ollama
`Modelfile` that stops on the trained end-of-turn token. Then it loads the file back:

1. with transformers' GGUF reader: the token ids of sample texts must be identical; every weight read back must equal
   the merged weight rounded to its quant type (names, row order and packing proven); the logits on the
   verification prompts must stay within a tolerance set per quant type. For the lossy types (q8_0 ... q4_0) how
   much rounding costs depends on the model, so outside that tolerance a note warns instead, unless top-1 agreement
   falls below half the usual value;
2. with llama.cpp itself when llama-cpp-python is installed (`pip install "lorafit[gguf]"`): tokenization equal,
   and greedy generations on the verification prompts reported.

A failed check raises RunFailed (exit 2); the caller writes into a staging folder, so nothing that looks finished is
left behind. `check_exportable` refuses unsupported architectures and tokenizers before any weights are read.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafit.errors import LorafitError, RunFailed
from lorafit.gguf_vocabulary import Vocabulary, as_llama_cpp_splits, describe_vocabulary, write_vocabulary

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

QUANTS = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"
# transformers architecture -> (llama.cpp architecture, whether Q/K rows are permuted to llama.cpp's RoPE layout).
# Llama and Mistral store Q/K for the "rotate half" RoPE; llama.cpp's llama graph expects interleaved pairs, so
# convert_hf_to_gguf.py permutes them (LlamaModel.permute); Qwen's graph uses the "neox" layout as stored.
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}
# Architectures llama.cpp runs but whose GGUF this exporter refuses, and why.
REFUSED = {
    # llama.cpp's gemma graph exists (convert_hf_to_gguf.py adds 1 to the RMSNorm weights, as Gemma's norm is
    # x * (1 + w)), but transformers' GGUF reader has no `gemma` architecture (only gemma2/3/4), so the file could not
    # be loaded back and verified.
    "GemmaForCausalLM": "transformers' GGUF reader cannot load llama.cpp's `gemma` architecture back, so the file "
                        "could not be verified",
}
# Max |logit difference| between the reloaded GGUF model and the merged model, relative to the largest logit, and
# the share of positions whose top-1 token must agree. f32 is exact up to summation order; 16-bit rounds each weight
# once; the block quantizers round to 8/5/4 bits per weight. The check is there to catch a wrong file (permuted
# rows, a shifted vocabulary: differences as large as the logits, top-1 near 0%), not to grade quantization, whose
# cost it reports. Measured on SmolLM2-135M with a random r=16 adapter that moves its logits by up to 32 (a worst
# case: trained adapters move them far less): f16 0.3% and 100% top-1, q8_0 10.3% and 91.2%.
TOLERANCE = {"f32": 1e-3, "f16": 0.03, "bf16": 0.1, "q8_0": 0.25, "q5_1": 0.4, "q5_0": 0.4, "q4_1": 0.5, "q4_0": 0.5}
# Lossy types are judged by their weights (the file must hold exactly the rounded weights) and their logit figures
# are reported: outside these tolerances a note warns, since how much rounding costs depends on the model.
LOSSY = ("q8_0", "q5_1", "q5_0", "q4_1", "q4_0")
MIN_TOP1 = {"f32": 0.99, "f16": 0.95, "bf16": 0.9, "q8_0": 0.8, "q5_1": 0.7, "q5_0": 0.7, "q4_1": 0.6, "q4_0": 0.6}
# Texts whose token ids must come back identical: spaces, newlines, digits, punctuation, non-Latin scripts, emoji.
_SAMPLE_TEXTS = ("Hello world! How are you today?", "  two  spaces, a\ttab and\nnew\n\nlines  ",
                 "3 33 333 3333 3.14159 -42 1,000,000", "I've been 'told' he's there; we'd (maybe) go.",
                 "Ünïcödé: naïve café, Привет мир, 你好世界, こんにちは 🚀🦙")
_GENERATION_TOKENS = 24


@dataclass
class GgufReport:
    """What was written and how it was verified."""

    file: str
    quant: str
    size_bytes: int
    architecture: str  # llama.cpp's name (general.architecture)
    tokenizer_model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    tokenizer_pre: str
    stop: list[str]  # the end-of-turn token(s) the Modelfile stops on
    max_logit_diff: float
    tolerance: float
    top1_agreement: float
    min_top1: float
    texts_checked: int  # sample texts whose token ids matched exactly
    weights_checked: int  # tensors read back equal to the merged weights rounded to their quant type
    verified_with: list[str]  # "transformers", and "llama.cpp" when llama-cpp-python is installed
    llama_cpp: dict[str, Any] | None = None  # tokenization check and greedy generations through llama.cpp
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------
# Before any work


def check_exportable(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, quant: str) -> str:
    """Refuse what this exporter cannot write faithfully, before weights are loaded; returns llama.cpp's arch name."""
    if quant not in QUANTS:
        raise LorafitError(f"unknown quant type {quant!r}", where="--quant", hint=f"one of: {', '.join(QUANTS)}")
    architecture = llama_cpp_architecture(config, "gguf")
    _rope(config)  # raises on RoPE scaling llama.cpp would read differently
    describe_vocabulary(tokenizer)  # raises on tokenizers llama.cpp has no faithful equivalent for
    return architecture


def llama_cpp_architecture(config: PretrainedConfig, fmt: str) -> str:
    """llama.cpp's name for the model's architecture; refuses the ones this exporter does not write."""
    architecture = (getattr(config, "architectures", None) or [None])[0]
    if architecture in REFUSED:
        raise LorafitError(f"GGUF export of {architecture} is refused: {REFUSED[architecture]}; supported: "
                           f"{', '.join(ARCHITECTURES)}", where=f"--format {fmt}",
                           hint="export with --format safetensors (the default) instead")
    if architecture not in ARCHITECTURES:
        raise LorafitError(
            f"GGUF export supports {', '.join(ARCHITECTURES)}; this model is {architecture or config.model_type}",
            where=f"--format {fmt}", hint="export with --format safetensors (the default) instead")
    return ARCHITECTURES[architecture][0]


# ----------------------------------------------------------------------------------------------------
# Entry point


def export_gguf(model, tokenizer: PreTrainedTokenizerBase, folder: Path, *, quant: str, name: str,
                prompts: list[list[int]], reference: list[torch.Tensor]) -> GgufReport:
    """Write model.gguf + Modelfile into folder and verify them against the merged model's logits (`reference`)."""
    started = time.perf_counter()
    notes: list[str] = []
    path = folder / GGUF_FILE
    architecture, vocabulary = write_model_gguf(model, tokenizer, path, quant=quant, name=name, notes=notes)
    stop = end_of_turn_tokens(model, tokenizer)
    (folder / MODELFILE).write_text(modelfile(tokenizer, stop, notes), encoding="utf-8")
    texts = _sample_texts(tokenizer, prompts)
    splits = as_llama_cpp_splits(tokenizer, vocabulary)  # token ids are compared with the training tokenizer's
    checked = _check_tokenizer_transformers(path, splits, texts, vocabulary, notes)
    _note_split_differences(tokenizer, splits, texts, vocabulary, notes)
    max_diff, scale, top1, weights = _check_transformers(path, model, architecture, quant, prompts, reference, notes)
    tolerance = TOLERANCE[quant] * max(1.0, scale)
    within = max_diff <= tolerance and top1 >= MIN_TOP1[quant]
    # A lossy file still has to behave like the model: a wrong hyperparameter (rope, norms, heads) is not a weight
    # and would push top-1 agreement far below half the usual value.
    if quant in LOSSY and not within and not math.isnan(max_diff) and top1 >= MIN_TOP1[quant] / 2:
        # The weights are proven to be the merged ones rounded to the quant type, so what remains is how much the
        # rounding itself costs this model: small models lose more to 4-5 bits than the usual tolerance allows.
        notes.append(f"{quant} changes this model's logits more than it usually does: by up to {max_diff:.3g} "
                     f"(usual {tolerance:.3g}), top-1 agreement {100 * top1:.1f}% (usual {100 * MIN_TOP1[quant]:.0f}%);"
                     " the file holds exactly the rounded weights; prefer q8_0 or f16 if its answers suffer")
    elif not within:
        raise RunFailed(
            f"GGUF verification failed: {GGUF_FILE} loaded back differs from the merged model by up to {max_diff:.4g} "
            f"(tolerance {tolerance:.3g} for {quant}), top-1 agreement {100 * top1:.1f}% (needs "
            f"{100 * MIN_TOP1[quant]:.0f}%); nothing was written", where=str(path.parent),
            hint="try a less lossy --quant (q8_0, f16), or report this with --debug output")
    verified_with = ["transformers"]
    llama_cpp = _check_llama_cpp(path, model, splits, texts, _generation_prompts(tokenizer, prompts), notes)
    if llama_cpp is not None:
        verified_with.append("llama.cpp")
    return GgufReport(
        file=GGUF_FILE, quant=quant, size_bytes=path.stat().st_size, architecture=architecture,
        tokenizer_model=vocabulary.model, tokenizer_pre=vocabulary.pre, stop=stop, max_logit_diff=max_diff, tolerance=tolerance, top1_agreement=top1, min_top1=MIN_TOP1[quant],
        texts_checked=checked, weights_checked=weights, verified_with=verified_with, llama_cpp=llama_cpp,
        seconds=time.perf_counter() - started, notes=notes)


# ----------------------------------------------------------------------------------------------------
# Writing


def write_model_gguf(model, tokenizer: PreTrainedTokenizerBase, path: Path, *, quant: str, name: str,
                     notes: list[str]) -> tuple[str, Vocabulary]:
    """Write the model, its tokenizer and chat template as one GGUF file; returns (architecture, vocabulary)."""
    import gguf

    config = model.config
    architecture = check_exportable(config, tokenizer, quant)
    writer = gguf.GGUFWriter(path, architecture, use_temp_file=True)  # tensors spill to disk, not a 2nd RAM copy
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    _write_hyperparameters(writer, config, quant)
    vocabulary = write_vocabulary(writer, tokenizer, config.vocab_size)
    fallback = _write_tensors(writer, model, architecture, quant)
    if fallback:
        notes.append(f"{len(fallback)} tensor(s) kept in f16: their rows are not a multiple of the {quant} block "
                     f"size ({', '.join(fallback[:3])}{', ...' if len(fallback) > 3 else ''})")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return architecture, vocabulary


def _write_hyperparameters(writer, config: PretrainedConfig, quant: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta, scaling = _rope(config)
    writer.add_rope_freq_base(theta)
    if scaling and scaling["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    elif scaling and scaling["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(scaling["factor"])
        writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    writer.add_file_type(gguf.LlamaFileType["ALL_F32" if quant == "f32" else f"MOSTLY_{quant.upper()}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope(config: PretrainedConfig) -> tuple[float, dict[str, Any] | None]:
    """(rope theta, the scaling parameters when there are any); refuses scalings llama.cpp would read differently."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return float(theta), None
    if kind in ("linear", "yarn", "llama3") and params.get("factor") is not None:
        return float(theta), {**params, "rope_type": kind}
    raise LorafitError(f"RoPE scaling {kind!r} is not supported for GGUF export (linear, yarn and llama3 are)",
                       where="--format gguf", hint="export with --format safetensors instead")


def _llama3_rope_factors(config: PretrainedConfig, scaling: dict[str, Any]) -> np.ndarray:
    """Llama 3.1+ RoPE: llama.cpp applies per-frequency factors from a `rope_freqs` tensor (as convert_hf_to_gguf)."""
    import numpy as np

    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta, _ = _rope(config)
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _write_tensors(writer, model, architecture: str, quant: str) -> list[str]:
    """Every weight under its llama.cpp name, quantized; returns the names that fell back to f16."""
    import gguf

    config = model.config
    _, scaling = _rope(config)
    if scaling and scaling["rope_type"] == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(config, scaling),
                          raw_dtype=gguf.GGMLQuantizationType.F32)
    fallback = []
    for _, new_name, packed, kind, fell_back in _gguf_tensors(model, architecture, quant):
        writer.add_tensor(new_name, packed, raw_dtype=kind)
        if fell_back:
            fallback.append(new_name)
    return fallback


def _gguf_tensors(model, architecture: str, quant: str) -> Iterator[tuple[str, str, np.ndarray, Any, bool]]:
    """(transformers name, llama.cpp name, packed data, quant type, fell back to f16) of every tensor the file holds,
    in llama.cpp's row order, quantized as written: the writer and the weights check both read this."""
    import gguf
    import torch

    config = model.config
    names = tensor_names(config, architecture)
    qtype = gguf.GGMLQuantizationType[quant.upper()]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head = "token_embd.weight" if tied else "output.weight"  # the tensor that computes the logits
    for hf_name, tensor in model.state_dict().items():
        if (tied and hf_name == "lm_head.weight") or hf_name.endswith("rotary_emb.inv_freq"):
            continue
        new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise LorafitError(f"the model has a tensor llama.cpp's {architecture} graph has no place for: {hf_name}",
                               where="--format gguf", hint="export with --format safetensors instead")
        array = to_llama_cpp_rows(tensor.detach().to(torch.float32), hf_name.rsplit(".", 1)[0], config).cpu().numpy()
        kind = qtype
        if array.ndim <= 1 or new_name.endswith("_norm.weight"):
            kind = gguf.GGMLQuantizationType.F32  # llama.cpp computes norms and biases in f32
        elif new_name == head and quant in ("q5_1", "q5_0", "q4_1", "q4_0"):
            # llama.cpp's own quantizer keeps the output head at 6 bits for these; gguf-py has no Q6_K writer, so 8.
            kind = gguf.GGMLQuantizationType.Q8_0
        try:
            yield hf_name, new_name, gguf.quants.quantize(array, kind), kind, False
        except gguf.QuantError:
            yield hf_name, new_name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.F16), \
                gguf.GGMLQuantizationType.F16, True


def tensor_names(config: PretrainedConfig, architecture: str):
    """gguf-py's map from transformers tensor names to llama.cpp's (blk.N.attn_q.weight, ...) for this model."""
    import gguf

    arch = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture)
    return gguf.get_tensor_name_map(arch, config.num_hidden_layers)


def to_llama_cpp_rows(rows: torch.Tensor, module: str, config: PretrainedConfig, *, inverse: bool = False):
    """Q/K projection rows (weights, biases, LoRA B) in the order llama.cpp's Llama graph expects; others as they are.

    transformers' Llama applies RoPE to the two halves of each head ("rotate half"); llama.cpp's llama graph to
    adjacent pairs, so convert_hf_to_gguf.py permutes the rows (LlamaModel.permute). `inverse` undoes it.
    """
    if not ARCHITECTURES[config.architectures[0]][1] or not module.endswith(("q_proj", "k_proj")):
        return rows
    heads = config.num_attention_heads
    if module.endswith("k_proj"):
        heads = getattr(config, "num_key_value_heads", None) or heads
    split = (heads, rows.shape[0] // heads // 2, 2) if inverse else (heads, 2, rows.shape[0] // heads // 2)
    return rows.reshape(*split, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


# ----------------------------------------------------------------------------------------------------
# Ollama


def end_of_turn_tokens(model, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The token(s) generation must stop on: the trained end-of-turn (the tokenizer's eos) and the model's eos ids."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for token_id in configured if isinstance(configured, list) else [configured]:
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return [tokenizer.convert_ids_to_tokens(token_id) for token_id in ids]


_ROLES = ("system", "user", "assistant")


def modelfile(tokenizer: PreTrainedTokenizerBase, stop: list[str], notes: list[str]) -> str:
    """An Ollama Modelfile: the GGUF next to it, the chat template as a Go template, and the stop tokens."""
    lines = [f"FROM ./{GGUF_FILE}", ""]
    pieces = chat_pieces(tokenizer)
    bos = tokenizer.bos_token
    if pieces is not None and bos and _adds_bos(tokenizer) and pieces["start"].startswith(bos):
        # Llama 2 / Mistral templates write BOS themselves; llama.cpp (so Ollama) puts it before every prompt already
        # (tokenizer.ggml.add_bos_token), and the template's own would make it two.
        pieces = {**pieces, "start": pieces["start"][len(bos):]}
    if pieces is not None:
        lines += [f'TEMPLATE """{_go_template(pieces)}"""', ""]
        if pieces["default_system"]:
            lines += [f'SYSTEM """{pieces["default_system"]}"""', ""]
    elif not tokenizer.chat_template:
        lines += ['TEMPLATE """{{ .Prompt }}"""', ""]  # a plain language model: the prompt as it is
    else:
        notes.append("the chat template has a shape lorafit cannot rewrite as an Ollama Go template, so the Modelfile "
                     "has no TEMPLATE line; Ollama then picks one by matching the template stored in the GGUF")
    lines += [f"PARAMETER stop {json.dumps(token, ensure_ascii=False)}" for token in stop]
    return "\n".join(lines) + "\n"


def chat_pieces(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any] | None:
    """The text the chat template puts around each role's content, found by rendering marker messages.

    Ollama wants a Go template, not Jinja. Templates of the common shape -- each message wrapped in a fixed prefix and
    suffix per role, a generation prompt, maybe a default system message -- are rebuilt from these pieces, and the
    rebuilt one must render sample conversations exactly as the Jinja one does. None when that does not hold.
    """
    if not tokenizer.chat_template:
        return None
    m = {name: f"\x00{name.upper()}\x00" for name in ("system", "user", "assistant", "again")}
    system, user, assistant = ({"role": r, "content": m[r]} for r in _ROLES)
    again = {"role": "user", "content": m["again"]}

    def render(messages, prompt=False):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)

    try:
        full, asked, prompted = render([system, user, assistant]), render([system, user]), render([system, user], True)
        turns, alone = render([user, assistant, again]), render([user])
    except Exception:  # noqa: BLE001 - a template that cannot render plain messages has no Go equivalent
        return None

    def cut(text, left, right):  # the text between two markers (or the text's ends, for None)
        a = text.index(m[left]) + len(m[left]) if left else 0
        return text[a:text.index(m[right])] if right else text[a:]

    try:
        assistant_suffix, user_suffix = cut(full, "assistant", None), cut(asked, "user", None)
        if not prompted.startswith(asked):
            return None
        generation = prompted[len(asked):]
        user_prefix = cut(turns, "assistant", "again").removeprefix(assistant_suffix)
        between = cut(full, "system", "user")
        pieces = {"start": "", "default_system": "",
                  "system": (cut(full, None, "system"), between[:len(between) - len(user_prefix)]),
                  "user": (user_prefix, user_suffix),
                  "assistant": (cut(full, "user", "assistant").removeprefix(user_suffix), assistant_suffix),
                  "generation": generation}
        lead = cut(alone, None, "user").removesuffix(user_prefix)
    except ValueError:  # a marker went missing: the template drops or rewrites messages
        return None
    sys_prefix, sys_suffix = pieces["system"]
    if lead and lead.startswith(sys_prefix) and lead.endswith(sys_suffix):
        pieces["default_system"] = lead[len(sys_prefix):len(lead) - len(sys_suffix)]  # SmolLM2 inserts one
    elif sys_prefix.startswith(lead):
        pieces["start"], pieces["system"] = lead, (sys_prefix[len(lead):], sys_suffix)  # e.g. a BOS token
    samples = [[user], [system, user], [user, assistant, again], [system, user, assistant, again]]
    for messages in samples:
        sent = messages  # what Ollama renders: its SYSTEM line becomes the first message when there is none
        if pieces["default_system"] and messages[0]["role"] != "system":
            sent = [{"role": "system", "content": pieces["default_system"]}, *messages]
        for prompt in (False, True):
            if render_pieces(pieces, sent, add_generation_prompt=prompt) != render(messages, prompt):
                return None
    return pieces


def render_pieces(pieces: dict[str, Any], messages: list[dict[str, str]], *, add_generation_prompt: bool) -> str:
    """What the Go template written by `_go_template` renders for these messages (the same rules, in Python)."""
    text = pieces["start"]
    for message in messages:
        prefix, suffix = pieces[message["role"]]
        text += prefix + message["content"] + suffix
    if add_generation_prompt:
        text += pieces["generation"]
    return text


def _go_template(pieces: dict[str, Any]) -> str:
    def go(text: str) -> str:  # a literal inside a Go template: only "{{" would be read as an action
        return text.replace("{{", '{{ "{{" }}')

    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{go(pieces[role][0])}{{{{ .Content }}}}'
        f"{go(pieces[role][1])}"
        for i, role in enumerate(_ROLES))
    return (f"{go(pieces['start'])}{{{{ range $i, $_ := .Messages }}}}"
            f"{{{{ $last := eq (len (slice $.Messages $i)) 1 }}}}{branches}{{{{ end }}}}"
            f'{{{{ if and $last (ne .Role "assistant") }}}}{go(pieces["generation"])}{{{{ end }}}}{{{{ end }}}}')


# ----------------------------------------------------------------------------------------------------
# Verification


def _sample_texts(tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]]) -> list[str]:
    """The verification prompts as text (special tokens and all) plus texts that stress the pre-tokenizer."""
    texts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in prompts]
    return [t for t in texts if "\ufffd" not in t] + list(_SAMPLE_TEXTS)  # a cut mid-character is not a text


def _check_tokenizer_transformers(path: Path, tokenizer: PreTrainedTokenizerBase, texts: list[str],
                                  vocabulary: Vocabulary, notes: list[str]) -> int:
    """transformers' GGUF tokenizer must give the same ids as `tokenizer` (the training one, splitting text as
    llama.cpp does); returns the texts checked."""
    from transformers import AutoTokenizer
    from transformers.integrations.gguf import gguf_tokenizer_mapping

    loaded = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    pre = vocabulary.pre
    if vocabulary.model == "llama":
        # transformers rebuilds a SentencePiece vocabulary with its own Metaspace rule and ignores add_space_prefix;
        # the tokens, scores (the merge order), byte tokens and special tokens are checked here under llama.cpp's
        # rule, which llama.cpp itself checks when it is installed.
        loaded.backend_tokenizer.normalizer = tokenizer.backend_tokenizer.normalizer
        loaded.backend_tokenizer.pre_tokenizer = tokenizer.backend_tokenizer.pre_tokenizer
    elif pre != "gpt-2" and pre not in gguf_tokenizer_mapping.GGUF_PRE_TOKENIZER_SPLITS:
        # transformers rebuilds only some of llama.cpp's pre-tokenizers; the vocabulary, merges and special tokens
        # are still checked here with the training one, and llama.cpp checks the name when it is installed.
        loaded.backend_tokenizer.pre_tokenizer = tokenizer.backend_tokenizer.pre_tokenizer
        notes.append(f"transformers does not rebuild llama.cpp's {pre!r} pre-tokenizer; its token check used the "
                     "training tokenizer's splitting")
    for text in texts:
        _require_same_tokens(f"the tokenizer read back from {GGUF_FILE}", text, loaded(text)["input_ids"],
                             tokenizer(text)["input_ids"], path)
    if (loaded.chat_template or None) != (tokenizer.chat_template or None):
        raise RunFailed(f"GGUF verification failed: the chat template read back from {GGUF_FILE} differs from the "
                        "training one; nothing was written", where=str(path.parent))
    return len(texts)


def _note_split_differences(tokenizer: PreTrainedTokenizerBase, splits: PreTrainedTokenizerBase, texts: list[str],
                            vocabulary: Vocabulary, notes: list[str]) -> None:
    """Say which sample texts llama.cpp splits differently from the training tokenizer when their rules for the "▁"
    word marker differ (transformers' Metaspace tokenizers: llama.cpp only has SentencePiece's own rule)."""
    if splits is tokenizer:
        return
    differ = [text for text in texts if splits(text)["input_ids"] != tokenizer(text)["input_ids"]]
    if differ:
        where = "before text that already begins with a space" + (
            " and after a special token" if vocabulary.prefix_rule == "metaspace-first" else "")
        notes.append(f"{len(differ)} of {len(texts)} sample texts tokenize differently in llama.cpp than in training "
                     f"(e.g. {differ[0][:40]!r}): the training tokenizer ({vocabulary.prefix_rule}) leaves out the "
                     f"'\u2581' that SentencePiece and llama.cpp put {where}; every other token is the same")


def _check_transformers(path: Path, model, architecture: str, quant: str, prompts: list[list[int]],
                        reference: list[torch.Tensor], notes: list[str]) -> tuple[float, float, float, int]:
    """Read the file back with transformers' GGUF reader (an independent reader): every weight must equal what was
    written (the merged weight rounded to its quant type, which proves names, row order and packing; a mismatch
    raises RunFailed), then (max |logit diff|, largest reference logit, top-1 agreement) against the merged model's
    logits, and the number of weights compared."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    config = model.config
    extra = {}
    _, scaling = _rope(config)
    if scaling is not None:
        # transformers' GGUF reader keeps only rope theta; llama.cpp reads the scaling (checked there when installed).
        extra["config"] = config
        notes.append(f"transformers' GGUF reader ignores RoPE scaling ({scaling['rope_type']}); its logit check used "
                     "the merged model's config")
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32, **extra)
    loaded.eval()
    weights = loaded.state_dict()
    checked = 0
    # The tensors are quantized again rather than kept from writing: holding every packed tensor would cost the
    # file's size in memory on top of two models; quantizing is deterministic, so this is what the writer wrote.
    for hf_name, new_name, packed, kind, _ in _gguf_tensors(model, architecture, quant):
        written = torch.from_numpy(gguf.quants.dequantize(packed, kind).astype("float32"))
        want = to_llama_cpp_rows(written.reshape(weights[hf_name].shape), hf_name.rsplit(".", 1)[0], config,
                                 inverse=True)
        error = (weights[hf_name] - want).abs().max().item()
        if not error <= 1e-6 * max(1.0, want.abs().max().item()):  # written so that NaN fails too
            raise RunFailed(f"GGUF verification failed: {new_name} ({hf_name}) read back differs from the weights "
                            f"written by up to {error:.4g}; nothing was written", where=str(path.parent),
                            hint="report this with --debug output")
        checked += 1
    del weights
    max_diff = scale = 0.0
    agree = total = 0
    with torch.no_grad():
        for ids, want in zip(prompts, reference, strict=True):
            got = loaded(input_ids=torch.tensor([ids])).logits.float()[0]
            max_diff = max(max_diff, (got - want).abs().max().item())
            scale = max(scale, want.abs().max().item())
            agree += (got.argmax(-1) == want.argmax(-1)).sum().item()
            total += want.shape[0]
    del loaded
    return max_diff, scale, agree / total if total else 1.0, checked


def _check_llama_cpp(path: Path, model, tokenizer: PreTrainedTokenizerBase, texts: list[str],
                     prompts: list[list[int]], notes: list[str]) -> dict[str, Any] | None:
    """llama.cpp's tokenization must equal the training tokenizer's; its greedy answers are reported next to the
    merged model's. None without llama-cpp-python, or when llama.cpp crashed (said in `notes`)."""
    from lorafit.llama_cpp_run import NOT_INSTALLED, LlamaCppCrashed, crash_note, llama_cpp_installed, run_llama_cpp

    if not llama_cpp_installed():
        notes.append(NOT_INSTALLED)
        return None
    stop = tokenizer.convert_tokens_to_ids(end_of_turn_tokens(model, tokenizer))
    try:
        answer = run_llama_cpp(path, n_ctx=max(map(len, prompts), default=0) + _GENERATION_TOKENS + 64, texts=texts,
                               add_bos=_adds_bos(tokenizer), generate=prompts, max_tokens=_GENERATION_TOKENS, stop=stop)
    except LlamaCppCrashed as crash:
        notes.append(crash_note(crash, f"running {path.name}"))
        return None
    for text, got in zip(texts, answer["tokens"], strict=True):
        _require_same_tokens("llama.cpp", text, got, tokenizer(text)["input_ids"], path)
    generations = []
    for ids, out in zip(prompts, answer["generations"], strict=True):
        merged = _greedy(model, ids, set(stop))
        generations.append({"prompt": tokenizer.decode(ids), "llama_cpp": tokenizer.decode(out),
                            "merged_model": tokenizer.decode(merged), "same": out == merged})
    return {"tokenization_equal": True, "texts": len(texts), "greedy": generations,
            "greedy_same": sum(g["same"] for g in generations), "version": answer["version"]}


def _generation_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[list[int]]) -> list[list[int]]:
    """The verification prompts cut after their last generation prompt (e.g. "<|im_start|>assistant\\n"): what a
    user sends, so the greedy answers can be compared. Prompts without one are kept whole."""
    pieces = chat_pieces(tokenizer)
    cut = []
    for ids in prompts:
        text = tokenizer.decode(ids, skip_special_tokens=False)
        at = text.rfind(pieces["generation"]) if pieces and pieces["generation"] else -1
        cut.append(tokenizer(text[:at + len(pieces["generation"])])["input_ids"] if at >= 0 else ids)
    return cut


def _greedy(model, ids: list[int], stop: set[int]) -> list[int]:
    """The merged model's greedy continuation, up to an end-of-turn token."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=_GENERATION_TOKENS, do_sample=False,
                             eos_token_id=sorted(stop) or None, pad_token_id=model.generation_config.pad_token_id)
    new = out[0, len(ids):].tolist()
    end = next((i for i, token in enumerate(new) if token in stop), len(new))
    return new[:end]


def _adds_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    return tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]


def _require_same_tokens(reader: str, text: str, got: list[int], want: list[int], path: Path) -> None:
    """Fail the export when `reader` splits `text` into other token ids than the training tokenizer."""
    if got == want:
        return
    first = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
    raise RunFailed(f"GGUF verification failed: {reader} splits {text[:40]!r} differently from the training "
                    f"tokenizer (first difference at token {first}: {got[first:first + 3]} vs "
                    f"{want[first:first + 3]}); nothing was written", where=str(path.parent),
                    hint="report this with --debug output")
