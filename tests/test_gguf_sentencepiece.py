"""merge --format gguf with SentencePiece-style tokenizers (Llama 2, Mistral 7B v0.x): scores instead of merges,
byte tokens, BOS, llama.cpp's "▁" rule; and the architectures that stay refused (Gemma)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import torch
from peft import PeftModel
from tiny_models import build_config_only, build_tiny_model, write_lora_run
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from lorafit import gguf_export, gguf_vocabulary
from lorafit.errors import LorafitError
from lorafit.merge import AdapterSpec, MergeOptions, run_merge

# Byte fallback (characters the ASCII training corpus never saw), a leading space, runs of spaces, newlines and tabs,
# special tokens inside the text, the chat template's shape.
TEXTS = ["Hello world! How are you today?", " a leading space", "  two  spaces,\ta tab and\nnew\n\nlines  ",
         "naïve café, Привет, 你好 🚀🦙", "<s>[INST] red [/INST] apple</s>[INST] blue [/INST]", "3 33 333 3.14 -42"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny Llama- and Mistral-shaped bases with the Llama-2-style tokenizer (and one Llama with transformers 5's
    Metaspace rule), each with a random non-zero LoRA adapter; weights at 0.05 init scale as in test_gguf_export."""
    root = tmp_path_factory.mktemp("gguf-spm")
    found = {}
    for name, arch, rule in (("llama", "llama", "sentencepiece"), ("mistral", "mistral", "sentencepiece"),
                             ("metaspace", "llama", "metaspace-first")):
        base = build_tiny_model(root / f"{name}-base", arch, tokenizer=rule, initializer_range=0.05)
        found[name] = base
        found[f"{name}-adapter"] = write_lora_run(root / f"{name}-run", base, r=4, seed=1,
                                                  target_modules=("q_proj", "k_proj", "v_proj", "down_proj"))
    return found


def gguf_fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


def merged_logits(base: Path, adapter: Path, ids: list[int]) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


@pytest.mark.parametrize(("name", "quant", "atol"), [("llama", "f16", 0.02), ("llama", "q8_0", 0.1),
                                                      ("mistral", "f16", 0.02), ("mistral", "q8_0", 0.1)])
def test_sentencepiece_vocabulary_round_trips_with_the_merged_logits(runs, tmp_path, name, quant, atol):
    """Llama 2 / Mistral v0.x shape, f16 and q8_0: the GGUF holds a SentencePiece vocabulary (tokenizer model `llama`,
    scores, no merges, UNKNOWN/CONTROL/BYTE types, BOS added, space prefix on); read back by transformers it gives the
    training tokenizer's ids on every text -- byte fallback, a leading space, runs of spaces, newlines, special tokens
    -- and the logits of base+adapter."""
    out = tmp_path / "export"
    result = run_merge(MergeOptions([AdapterSpec(runs[f"{name}-adapter"])], out, fmt="gguf", quant=quant))
    report = result.gguf
    assert (report.architecture, report.tokenizer_model, report.tokenizer_pre) == ("llama", "llama", "default")
    assert report.max_logit_diff <= report.tolerance and report.top1_agreement >= report.min_top1
    assert not any("tokenize differently" in note for note in report.notes)

    trained = AutoTokenizer.from_pretrained(runs[f"{name}-adapter"])
    fields = gguf_fields(out / "model.gguf")
    assert fields["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in fields
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_space_prefix"] is True
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    tokens, types, scores = (fields[f"tokenizer.ggml.{key}"] for key in ("tokens", "token_type", "scores"))
    assert tokens[:4] == ["<unk>", "<s>", "</s>", "<0x00>"] and tokens[258] == "<0xFF>"
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert set(types[3:259]) == {gguf.TokenType.BYTE} and set(types[259:]) == {gguf.TokenType.NORMAL}
    # The merge order lives in the scores: a token made by an earlier merge scores higher.
    merges = json.loads(trained.backend_tokenizer.to_str())["model"]["merges"]
    first, later = ("".join(pair) for pair in (merges[0], merges[-1]))
    assert scores[tokens.index(first)] > scores[tokens.index(later)]

    reread = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    reread.backend_tokenizer.normalizer = trained.backend_tokenizer.normalizer  # llama.cpp's "▁" rule (see module)
    reread.backend_tokenizer.pre_tokenizer = trained.backend_tokenizer.pre_tokenizer
    for text in TEXTS:
        assert reread(text)["input_ids"] == trained(text)["input_ids"], text
    assert "<0xC3>" in trained.convert_ids_to_tokens(trained(TEXTS[3])["input_ids"])  # byte fallback is exercised
    assert reread.chat_template == trained.chat_template

    ids = trained(TEXTS[4])["input_ids"]
    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        got = loaded(input_ids=torch.tensor([ids])).logits[0]
    assert (got - merged_logits(runs[name], runs[f"{name}-adapter"], ids)).abs().max() < atol
    modelfile = (out / "Modelfile").read_text()
    assert 'PARAMETER stop "</s>"' in modelfile and "[INST] {{ .Content }} [/INST]" in modelfile
    # The template writes <s> itself; llama.cpp adds BOS to every prompt (add_bos_token), so Ollama's must not.
    assert trained.chat_template.startswith("{{ bos_token }}") and 'TEMPLATE """{{ range' in modelfile


def test_metaspace_tokenizer_is_exported_and_the_texts_llama_cpp_splits_otherwise_are_named(runs, tmp_path):
    """transformers 5's Llama tokenizer (Metaspace, "▁" only at the start of the text): llama.cpp has only
    SentencePiece's rule, so the file is verified under that rule, and the texts whose ids differ from training
    (a leading space, text after a special token) are reported, not hidden."""
    out = tmp_path / "export"
    report = run_merge(MergeOptions([AdapterSpec(runs["metaspace-adapter"])], out, fmt="gguf", quant="f16")).gguf
    assert report.tokenizer_model == "llama" and report.max_logit_diff <= report.tolerance
    note = next(note for note in report.notes if "tokenize differently in llama.cpp" in note)
    assert "metaspace-first" in note and "after a special token" in note
    assert gguf_fields(out / "model.gguf")["tokenizer.ggml.add_space_prefix"] is True

    trained = AutoTokenizer.from_pretrained(runs["metaspace-adapter"])
    vocabulary = gguf_vocabulary.describe_vocabulary(trained)
    assert (vocabulary.prefix_rule, vocabulary.splits_like_training) == ("metaspace-first", False)
    as_llama_cpp = gguf_vocabulary.as_llama_cpp_splits(trained, vocabulary)
    assert as_llama_cpp(" a")["input_ids"] != trained(" a")["input_ids"]  # llama.cpp: "▁▁a"; training: "▁a"
    assert as_llama_cpp("hello world")["input_ids"] == trained("hello world")["input_ids"]


def test_gemma_is_refused_because_its_gguf_cannot_be_read_back(tmp_path):
    """Gemma: llama.cpp runs it, but transformers' GGUF reader has no `gemma` architecture, so an export could not be
    verified; refused before any weights are read, naming the reason and what is supported (exit 1)."""
    config = AutoConfig.from_pretrained(build_config_only(tmp_path / "gemma", "gemma"))
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "llama", "llama", tokenizer="sentencepiece"))
    with pytest.raises(LorafitError) as caught:
        gguf_export.check_exportable(config, tokenizer, "f16")
    message = str(caught.value)
    assert caught.value.exit_code == 1 and "GemmaForCausalLM" in message and "could not be verified" in message
    assert "LlamaForCausalLM" in message and "MistralForCausalLM" in message


def test_tokenizers_llama_cpp_cannot_reproduce_are_refused_naming_the_supported_ones():
    """A Unigram tokenizer (T5-style) and a byte-fallback BPE that splits on whitespace without SentencePiece's "▁"
    are refused before any work, naming the supported tokenizer types."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], unk_id=0))
    odd = Tokenizer(models.BPE(vocab={"<unk>": 0, "a": 1}, merges=[], byte_fallback=True, unk_token="<unk>"))
    odd.pre_tokenizer = pre_tokenizers.Whitespace()
    for backend in (unigram, odd):
        with pytest.raises(LorafitError, match="SentencePiece-style BPE with byte fallback") as caught:
            gguf_vocabulary.describe_vocabulary(PreTrainedTokenizerFast(tokenizer_object=backend))
        assert "Llama 2" in str(caught.value) and caught.value.exit_code == 1


def test_llama_cpp_tokenizes_the_sentencepiece_vocabulary_like_training(runs, tmp_path):
    """Where llama-cpp-python is installed: llama.cpp reads the SentencePiece vocabulary back with the training
    tokenizer's ids (BOS, byte fallback, leading and repeated spaces, special tokens) and the merged logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "export"
    report = run_merge(MergeOptions([AdapterSpec(runs["llama-adapter"])], out, fmt="gguf", quant="f16")).gguf
    assert report.verified_with == ["transformers", "llama.cpp"] and report.llama_cpp["tokenization_equal"]
    trained = AutoTokenizer.from_pretrained(runs["llama-adapter"])
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=128, logits_all=True, verbose=False)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == trained(text)["input_ids"], text
    ids = trained(TEXTS[4])["input_ids"]
    llm.eval(ids)
    got = torch.tensor(llm.scores[: len(ids)])
    assert (got - merged_logits(runs["llama"], runs["llama-adapter"], ids)).abs().max() < 0.05
