"""llama.cpp, run in a child process for the GGUF checks of `lorafit merge`.

llama-cpp-python is native code built on the user's machine. A build whose CPU kernels are broken (seen: q8_0 on an
Intel Xeon with AMX, llama-cpp-python 0.3.36 built with -march=native) dies with a segmentation fault, which in
process would end `lorafit merge` with no message and no result. In a child, a crash is reported: the caller
notes it and the checks that do not need llama.cpp still decide.

`run_llama_cpp` is the entry point. The child is `python -m lorafit.llama_cpp_run`: it reads one request as JSON on
stdin and writes one answer as JSON on stdout (logits go to .npy files in a folder the parent owns).
"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

_TIMEOUT_SECONDS = 1800


class LlamaCppCrashed(Exception):
    """The llama.cpp child died (a signal, a non-zero exit) or ran out of time; the message says how."""


NOT_INSTALLED = 'llama.cpp check skipped: llama-cpp-python is not installed (pip install "lorafit[gguf]")'


def llama_cpp_installed() -> bool:
    """Whether llama-cpp-python can be imported (without importing it here)."""
    return importlib.util.find_spec("llama_cpp") is not None


def crash_note(crash: LlamaCppCrashed, doing: str) -> str:
    """The note a GGUF check records when llama.cpp crashed while `doing` (e.g. "running model.gguf")."""
    return (f"llama.cpp check failed: the installed llama-cpp-python crashed {doing} ({crash}); the file passed every "
            "other check, so this is likely that build on this CPU: run the file with your own llama.cpp / Ollama, "
            "or rebuild llama-cpp-python (README, GGUF)")


def run_llama_cpp(model_path: Path, *, n_ctx: int, lora_path: Path | None = None, texts: list[str] = (),
                  add_bos: bool = False, generate: list[list[int]] = (), max_tokens: int = 0, stop: list[int] = (),
                  logits_for: list[list[int]] = (), logits_dir: Path | None = None) -> dict[str, Any]:
    """Load the GGUF file (and a LoRA file) in llama.cpp in a child process and return what was asked:
    `tokens` (each text's token ids), `generations` (each prompt's greedy continuation, up to `max_tokens` or a
    `stop` id), `logits` (paths of .npy files under `logits_dir`, one per prompt) and `version`.
    Raises LlamaCppCrashed when the child does not finish."""
    request = {"model_path": str(model_path), "lora_path": str(lora_path) if lora_path else None, "n_ctx": n_ctx,
               "texts": list(texts), "add_bos": add_bos, "generate": [list(p) for p in generate],
               "max_tokens": max_tokens, "stop": list(stop), "logits_for": [list(p) for p in logits_for],
               "logits_dir": str(logits_dir) if logits_dir else None}
    try:
        done = subprocess.run([sys.executable, "-m", "lorafit.llama_cpp_run"], input=json.dumps(request),
                              capture_output=True, text=True, timeout=_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired as exc:
        raise LlamaCppCrashed(f"no answer within {_TIMEOUT_SECONDS} s") from exc
    if done.returncode != 0:
        how = (f"killed by {signal.Signals(-done.returncode).name}" if done.returncode < 0
               else f"exit code {done.returncode}")
        last = next((line for line in reversed(done.stderr.splitlines()) if line.strip()), "")
        raise LlamaCppCrashed(how + (f": {last.strip()[:200]}" if last and done.returncode > 0 else ""))
    return json.loads(done.stdout.splitlines()[-1])


def _answer(request: dict[str, Any]) -> dict[str, Any]:
    """The child's work: everything the request asks of one loaded llama.cpp model."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=request["model_path"], lora_path=request["lora_path"], n_ctx=request["n_ctx"],
                          n_threads=2, logits_all=bool(request["logits_for"]), verbose=False, seed=0)
    answer: dict[str, Any] = {"version": getattr(llama_cpp, "__version__", None), "logits": []}
    answer["tokens"] = [llm.tokenize(text.encode("utf-8"), add_bos=request["add_bos"], special=True)
                        for text in request["texts"]]
    stop = set(request["stop"])
    answer["generations"] = []
    for ids in request["generate"]:
        out: list[int] = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if token in stop or token == llm.token_eos() or len(out) >= request["max_tokens"]:
                break
            out.append(token)
        answer["generations"].append(out)
    for index, ids in enumerate(request["logits_for"]):
        llm.reset()
        llm.eval(ids)
        path = Path(request["logits_dir"]) / f"logits-{index}.npy"
        np.save(path, np.array(llm.scores[: len(ids)], dtype=np.float32))
        answer["logits"].append(str(path))
    llm.close()
    return answer


if __name__ == "__main__":
    print(json.dumps(_answer(json.loads(sys.stdin.read()))))
