"""`lorafit push FOLDER --repo user/name`: share a run's adapter (or a merged model, or a GGUF export) on the
Hugging Face Hub, with its model card, in one commit.

What is uploaded is decided and checked here before any network call:
- `--what adapter` (FOLDER is a run folder): adapter/ (adapter_config.json naming the base model's hub id, not this
  machine's cache path), README.md (the run's model card with `base_model` / `library_name` / tags metadata and
  the paths replaced by the repo), recipe.yaml (paths made relative), metrics.json, loss.png.
- `--what merged` / `--what gguf` (FOLDER is `lorafit merge`'s output): its files, the card with metadata.
- Nothing that names this machine's paths (home, working directory, the run folder), its user name or a token
  is uploaded: every text file is scanned, and a hit is one line naming the file. `--dry-run` lists the files.
No token, offline, or a repo the token cannot write: one line; the files go in one commit, so a failure leaves
nothing half-uploaded. `HF_ENDPOINT` points the client elsewhere (the tests use a local server).
"""

from __future__ import annotations

import getpass
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from lorafit import run_folder
from lorafit.errors import LorafitError, first_line

WHAT = ("adapter", "merged", "gguf")
# Built-in aliases and the hub models they are (lorafit converts them locally; the Hub knows the original).
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}")
_TEXT_SUFFIXES = {".json", ".yaml", ".yml", ".md", ".txt", ".jinja", ".py", ""}


@dataclass
class PushResult:
    """What was (or, with --dry-run, would be) uploaded, and where."""

    repo: str
    what: str
    base_model: str
    files: dict[str, int]  # path in the repo -> size in bytes
    dry_run: bool
    private: bool
    url: str | None = None  # the commit, once pushed
    notes: list[str] = field(default_factory=list)


def run_push(folder: Path, repo: str, *, what: str = "adapter", private: bool = False, dry_run: bool = False,
             base_model: str | None = None) -> PushResult:
    """Collect the files, check them for anything naming this machine, then (unless dry_run) upload them."""
    if what not in WHAT:
        raise LorafitError(f"unknown value {what!r}", where="--what", hint=f"one of: {', '.join(WHAT)}")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo):
        raise LorafitError(f"not a repo id: {repo!r}", where="--repo", hint="user/name or org/name")
    folder = Path(folder).expanduser()
    files, base = _collect(folder, what, repo, base_model)
    _check_private_data(files, folder)
    result = PushResult(repo, what, base, {name: len(data) for name, data in files.items()}, dry_run, private)
    if not dry_run:
        result.url = _upload(repo, files, private=private, message=f"lorafit push: {what} from {folder.name}")
    return result


# ----------------------------------------------------------------------------------------------------
# What is uploaded


def _collect(folder: Path, what: str, repo: str, base_model: str | None) -> tuple[dict[str, bytes], str]:
    """The files to upload (path in the repo -> bytes) and the base model's hub id."""
    if what == "adapter":
        return _run_files(folder, repo, base_model)
    record = run_folder.read_json_object(folder / run_folder.MERGE_RECORD)
    if record is None:
        raise LorafitError("not a `lorafit merge` output (no merge.json)", where=str(folder),
                           hint=f"--what {what} uploads a folder written by lorafit merge")
    is_gguf = str(record.get("format", "safetensors")).startswith("gguf")
    if is_gguf != (what == "gguf"):
        raise LorafitError(f"this merge wrote format {record.get('format')}", where=str(folder),
                           hint=f"use --what {'gguf' if is_gguf else 'merged'}")
    base = _hub_id(base_model or str(record.get("base") or ""), where="merge.json base")
    skip = {run_folder.MERGE_RECORD, run_folder.MODEL_CARD, "lorafit.json"}
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name not in skip}
    card = (folder / run_folder.MODEL_CARD).read_text(encoding="utf-8") if (folder / run_folder.MODEL_CARD).is_file() else ""
    library = "gguf" if what == "gguf" else "transformers"
    files[run_folder.MODEL_CARD] = _card(card, base, library, ["lorafit", "merged" if what == "merged" else "gguf"],
                                         {str(folder.resolve()): repo, str(folder): repo}).encode()
    return files, base


def _run_files(run: Path, repo: str, base_model: str | None) -> tuple[dict[str, bytes], str]:
    import yaml

    adapter = run / run_folder.ADAPTER
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        raise LorafitError("no adapter/adapter_config.json: not a finished run folder", where=str(run),
                           hint="push a run folder that `lorafit train` finished")
    recipe = yaml.safe_load((run / run_folder.RECIPE).read_text(encoding="utf-8")) if (
        run / run_folder.RECIPE).is_file() else {}
    base = _hub_id(base_model or str((recipe.get("model") or {}).get("path") or ""), where="recipe model.path")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    local_base = str(config.get("base_model_name_or_path") or "")
    config["base_model_name_or_path"] = base  # was the folder it was loaded from here (a cache path)
    replacements = {str(adapter.resolve()): repo, str(adapter): repo, str(run.resolve()): ".", str(run): "."}
    if local_base:
        replacements[local_base] = base
    for path in _absolute_paths(recipe):  # the data files the card and metrics.json name: as the recipe writes them
        replacements.setdefault(path, _relative_paths(path, run))
    files = {}
    for path in sorted(adapter.rglob("*")):
        if path.is_file() and path.name != "adapter_config.json":
            data = path.read_bytes()
            if path.suffix in _TEXT_SUFFIXES:  # e.g. tokenizer_config.json's name_or_path: the local folder
                data = _replace(data.decode("utf-8", errors="surrogateescape"), replacements).encode(
                    "utf-8", errors="surrogateescape")
            files[path.relative_to(adapter).as_posix()] = data
    files["adapter_config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    if recipe:
        recipe["model"]["path"] = base
        files[run_folder.RECIPE] = yaml.safe_dump(_relative_paths(recipe, run), sort_keys=False).encode()
    if (run / run_folder.METRICS).is_file():
        metrics = json.loads((run / run_folder.METRICS).read_text(encoding="utf-8"))
        metrics["base_model"] = base
        metrics.pop("hardware", None)  # this machine's platform string names its kernel build
        if isinstance(metrics.get("data_cache"), dict):
            metrics["data_cache"].pop("path", None)  # this machine's prepared-data cache folder
        files[run_folder.METRICS] = _replace(json.dumps(metrics, indent=2), replacements).encode()
    if (run / run_folder.LOSS_CHART).is_file():
        files[run_folder.LOSS_CHART] = (run / run_folder.LOSS_CHART).read_bytes()
    card = (run / run_folder.MODEL_CARD).read_text(encoding="utf-8") if (run / run_folder.MODEL_CARD).is_file() else ""
    files[run_folder.MODEL_CARD] = _card(card, base, "peft", ["lorafit", "lora", "peft"], replacements).encode()
    return files, base


def _hub_id(model: str, *, where: str) -> str:
    """The base model as the Hub names it: a built-in alias's original, a hub id as it is; a local folder has none."""
    if model in HUB_IDS:
        return HUB_IDS[model]
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model) and not Path(model).expanduser().exists():
        return model
    raise LorafitError(f"the base model {model!r} is a local folder, which the Hub cannot name", where=where,
                       hint="pass --base-model org/name: the hub id of the model it is a copy of")


def _relative_paths(value, run: Path):
    """The recipe with absolute paths written relative to the run folder's parent (or as their file name)."""
    if isinstance(value, dict):
        return {key: _relative_paths(item, run) for key, item in value.items()}
    if isinstance(value, list):
        return [_relative_paths(item, run) for item in value]
    if isinstance(value, str) and os.path.isabs(value):
        path = Path(value)
        for root in (Path.cwd(), run.resolve().parent):
            if path.is_relative_to(root):
                return path.relative_to(root).as_posix()
        return path.name
    return value


def _absolute_paths(value) -> list[str]:
    """Every absolute path written in the recipe (data files, a custom template, reward files...)."""
    if isinstance(value, dict):
        return [path for item in value.values() for path in _absolute_paths(item)]
    if isinstance(value, list):
        return [path for item in value for path in _absolute_paths(item)]
    return [value] if isinstance(value, str) and os.path.isabs(value) else []


def _card(card: str, base: str, library: str, tags: list[str], replacements: dict[str, str]) -> str:
    """The model card with the metadata the Hub reads (YAML front matter) and this machine's paths replaced."""
    import yaml

    meta = yaml.safe_dump({"base_model": base, "library_name": library, "tags": tags}, sort_keys=False)
    return f"---\n{meta}---\n\n{_replace(card, replacements)}"


def _replace(text: str, replacements: dict[str, str]) -> str:
    for old in sorted(replacements, key=len, reverse=True):  # the longest first: a run folder inside a home folder
        text = text.replace(old, replacements[old])
    return text


def _check_private_data(files: dict[str, bytes], folder: Path) -> None:
    """Refuse (one line) when a text file names this machine's paths, its user name or a token."""
    from huggingface_hub import get_token

    home, cwd = str(Path.home()), str(Path.cwd())
    needles = {"this machine's home folder": home, "the working directory": cwd,
               "the folder pushed": str(folder.resolve())}
    user = getpass.getuser()
    if len(user) >= 3 and user not in ("root", "user", "runner"):
        needles["the user name"] = user
    token = get_token()
    for name, data in files.items():
        if Path(name).suffix not in _TEXT_SUFFIXES:
            continue
        text = data.decode("utf-8", errors="replace")
        if (token and token in text) or _TOKEN.search(text):
            raise LorafitError(f"{name} holds a Hugging Face token", where="push", hint="nothing was uploaded")
        for what, needle in needles.items():
            if needle and needle not in ("/", ".") and needle in text:
                raise LorafitError(f"{name} names {what} ({needle})", where="push",
                                   hint="nothing was uploaded; remove it from that file, or push another folder")


# ----------------------------------------------------------------------------------------------------
# Upload


def _upload(repo: str, files: dict[str, bytes], *, private: bool, message: str) -> str:
    """Create the repo if needed and upload every file in one commit; the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise LorafitError("HF_HUB_OFFLINE is set: the Hub cannot be reached", where="push",
                           hint="unset it to upload; --dry-run lists the files offline")
    token = get_token()
    if not token:
        raise LorafitError("no Hugging Face token", where="push",
                           hint="run `hf auth login` or set HF_TOKEN to a token with write access")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.whoami()
        api.create_repo(repo, private=private, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in files.items()]
        commit = api.create_commit(repo, operations, commit_message=message)
    except OfflineModeIsEnabled:
        raise LorafitError("offline mode is on: the Hub cannot be reached", where="push") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise LorafitError("the Hub refused the token (401)", where="push",
                               hint="run `hf auth login` again or set HF_TOKEN") from None
        if status in (403, 404):
            raise LorafitError(f"the token cannot write to {repo} ({status})", where="--repo",
                               hint="use a token with write access to that user or organisation") from None
        raise LorafitError(f"the Hub answered: {first_line(exc)}", where="push") from None
    except OSError as exc:  # connection refused, DNS, timeouts (httpx errors are not OSErrors: below)
        raise LorafitError(f"cannot reach the Hub: {first_line(exc)}", where="push") from None
    except Exception as exc:
        if type(exc).__module__.startswith(("httpx", "httpcore")):
            raise LorafitError(f"cannot reach the Hub: {first_line(exc)}", where="push") from None
        raise
    return str(commit.commit_url)
