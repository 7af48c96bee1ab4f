"""`lorafit push`: what goes to the Hub and how failures read.

Never the real Hub: the `huggingface_hub` client (HfApi) talks to a small HTTP server started in this test
process on 127.0.0.1 (HF_ENDPOINT), which implements the calls push makes: whoami-v2, repos/create, validate-yaml,
preupload and commit (every file "regular", so no LFS/xet transfer). It records each commit's files.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cli_helpers import assert_one_line_error, cli
from tiny_models import write_lora_run

pytestmark = pytest.mark.usefixtures("cli_in_this_process")

TOKEN = "hf_" + "x" * 34  # a token-shaped value: push must never upload it


class _Hub(BaseHTTPRequestHandler):
    """The Hub API calls lorafit push makes (and the client's README metadata check); `server.commits` collects (repo, {path: bytes}), `server.writable`
    the namespaces the token may write to."""

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._reply(401, {"error": "Invalid credentials"})
            return False
        return True

    def do_GET(self):  # noqa: N802
        if not self._authorized():
            return
        if self.path.startswith("/api/whoami-v2"):
            return self._reply(200, {"type": "user", "name": "me", "orgs": [], "auth": {"type": "access_token"}})
        self._reply(404, {"error": f"no route {self.path}"})

    def do_POST(self):  # noqa: N802
        if not self._authorized():
            return
        body = self._body()
        if self.path == "/api/validate-yaml":  # the client checks a README's metadata before committing it
            self.server.validated.append(json.loads(body))
            return self._reply(200, {})
        if self.path == "/api/repos/create":
            request = json.loads(body)
            namespace = request.get("organization") or "me"
            if namespace not in self.server.writable:
                return self._reply(403, {"error": "You don't have the rights to create a model under this namespace"})
            self.server.created.append({**request, "namespace": namespace})
            return self._reply(200, {"url": f"{self.server.endpoint}/{namespace}/{request['name']}"})
        parts = self.path.split("/")  # /api/models/<ns>/<name>/<preupload|commit>/<revision>
        if len(parts) >= 6 and parts[2] == "models" and parts[5] == "preupload":
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files]})
        if len(parts) >= 6 and parts[2] == "models" and parts[5] == "commit":
            repo = f"{parts[3]}/{parts[4]}"
            files = {}
            for line in body.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            self.server.commits.append((repo, files))
            return self._reply(200, {"commitUrl": f"{self.server.endpoint}/{repo}/commit/abc123",
                                     "commitOid": "abc123" + "0" * 34, "pullRequestUrl": None})
        self._reply(404, {"error": f"no route {self.path}"})


@pytest.fixture
def hub(monkeypatch):
    """A local Hub on 127.0.0.1 (HF_ENDPOINT), the token set in HF_TOKEN."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    server.endpoint = f"http://127.0.0.1:{server.server_port}"
    server.commits, server.created, server.validated, server.writable = [], [], [], {"me"}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants

    # conftest keeps the suite offline, and the client reads that once, at import: this test's Hub is on loopback
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield server
    server.shutdown()


@pytest.fixture
def run(tmp_path: Path, tiny_llama: Path) -> Path:
    """A run folder with an adapter on the tiny model, a model card and metrics naming this machine's paths."""
    folder = write_lora_run(tmp_path / "runs" / "demo", tiny_llama).parent
    (folder / "README.md").write_text(f"# demo\n\nbase loaded from `{tiny_llama}`; adapter `{folder / 'adapter'}`\n")
    (folder / "metrics.json").write_text(json.dumps({"base_model": str(tiny_llama), "train_loss_final": 1.5,
                                                     "hardware": {"platform": "Linux-6.1-x86_64"}}))
    return folder


def _push(*args: str) -> tuple[int, list[str]]:
    return cli("push", *args)


def test_adapter_push_is_one_commit_with_the_hub_id_and_no_local_paths(hub, run, tiny_llama):
    """The adapter, card, recipe and metrics go up in one commit: base model's hub id in adapter_config.json and the
    card's metadata, no path of this machine and no token in any file."""
    code, lines = _push(str(run), "--repo", "me/demo", "--base-model", "org/tiny", "--private")
    assert code == 0, lines
    (created,) = hub.created
    assert created["name"] == "demo" and (created.get("private") is True or created.get("visibility") == "private")
    (repo, files), = hub.commits
    assert repo == "me/demo"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "recipe.yaml",
            "metrics.json"} <= set(files)
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "org/tiny"
    card = files["README.md"].decode()
    assert card.startswith("---\nbase_model: org/tiny\nlibrary_name: peft\ntags:\n- lorafit\n")
    recipe = files["recipe.yaml"].decode()
    assert "path: org/tiny" in recipe and "path: " + str(run) not in recipe
    for name, data in files.items():
        if name.endswith((".json", ".md", ".yaml", ".jinja")):
            text = data.decode()
            assert str(tiny_llama) not in text and str(run) not in text and TOKEN not in text, name


def test_a_run_lorafit_trained_pushes_with_its_data_paths_made_relative(hub, make_recipe, tiny_llama, tmp_path,
                                                                       monkeypatch):
    """A real finished run whose data sits in the working folder: the card and metrics.json name the data files and
    the prepared-data cache; push writes the data paths relative, drops the cache folder, and uploads."""
    from rich.console import Console
    from tiny_models import write_toy_dataset

    from lorafit.recipe import validate_recipe
    from lorafit.train import run_train

    monkeypatch.chdir(tmp_path)
    data = write_toy_dataset(tmp_path / "data" / "toy.jsonl", n=16, fmt="messages")
    raw = make_recipe(tiny_llama, data, tmp_path / "runs" / "real", training={"max_steps": 2, "save_steps": 2})
    run_train(validate_recipe(raw), Console(quiet=True))
    assert str(data) in (tmp_path / "runs" / "real" / "README.md").read_text()
    code, lines = _push(str(tmp_path / "runs" / "real"), "--repo", "me/real", "--base-model", "org/tiny")
    assert code == 0, lines
    (_, files), = hub.commits
    card = files["README.md"].decode()
    assert "data/toy.jsonl" in card and str(tmp_path) not in card
    assert "path" not in json.loads(files["metrics.json"])["data_cache"]


def test_dry_run_lists_the_files_and_sends_nothing(hub, run):
    """--dry-run --json lists every file with its size; the server sees no call."""
    from typer.testing import CliRunner

    from lorafit.cli import app

    result = CliRunner().invoke(app, ["push", str(run), "--repo", "me/demo", "--base-model", "org/tiny",
                                      "--dry-run", "--json"])
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["dry_run"] and payload["url"] is None and "adapter_model.safetensors" in payload["files"]
    assert hub.commits == [] and hub.created == []


def test_a_file_naming_a_token_is_refused_before_upload(hub, run):
    """A token in any text file to upload: one line naming the file, and nothing reaches the server."""
    (run / "adapter" / "notes.txt").write_text(f"token {TOKEN}\n")
    code, lines = _push(str(run), "--repo", "me/demo", "--base-model", "org/tiny")
    assert_one_line_error(code, lines, "notes.txt holds a Hugging Face token", "nothing was uploaded")
    assert hub.commits == [] and hub.created == []


def test_local_base_without_hub_id_is_one_line(hub, run):
    """A run on a local model folder needs --base-model: the Hub cannot name this machine's folder."""
    code, lines = _push(str(run), "--repo", "me/demo")
    assert_one_line_error(code, lines, "local folder", "--base-model")


def test_no_token_is_one_line(hub, run, monkeypatch, tmp_path):
    """Without a token: one line saying how to log in; nothing uploaded."""
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored token either
    code, lines = _push(str(run), "--repo", "me/demo", "--base-model", "org/tiny")
    assert_one_line_error(code, lines, "no Hugging Face token", "HF_TOKEN")
    assert hub.commits == []


def test_offline_is_one_line(hub, run, monkeypatch):
    """HF_HUB_OFFLINE set: one line; --dry-run still works offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, lines = _push(str(run), "--repo", "me/demo", "--base-model", "org/tiny")
    assert_one_line_error(code, lines, "HF_HUB_OFFLINE")
    assert _push(str(run), "--repo", "me/demo", "--base-model", "org/tiny", "--dry-run")[0] == 0


def test_repo_the_token_cannot_write_is_one_line(hub, run):
    """A namespace the token may not write to (403 on create): one line; no commit."""
    code, lines = _push(str(run), "--repo", "someone-else/demo", "--base-model", "org/tiny")
    assert_one_line_error(code, lines, "cannot write to someone-else/demo")
    assert hub.commits == []


def test_unreachable_hub_is_one_line(run, monkeypatch):
    """Nothing listening at the endpoint: one line saying the Hub cannot be reached."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    code, lines = _push(str(run), "--repo", "me/demo", "--base-model", "org/tiny")
    assert_one_line_error(code, lines, "cannot reach the Hub")
