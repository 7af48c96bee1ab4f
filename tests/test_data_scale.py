"""Data at scale and data as the user meant it: Arrow reading, the prepared-data cache, one preparation per
machine, weighted mixing, streaming, and the file shapes users bring (CSV newlines, BOMs, wrapped JSON,
ShareGPT, content parts, numbers, special-token text)."""

from __future__ import annotations

import codecs
import csv
import json
import multiprocessing
import os
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lorafit import data_cache
from lorafit.data import eval_rows, prepare_classification_data, prepare_data
from lorafit.errors import LorafitError
from lorafit.recipe import validate_recipe


@pytest.fixture
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> Path:
    """Each test gets an empty prepared-data cache."""
    folder = tmp_path / "data-cache"
    monkeypatch.setenv("LORAFIT_DATA_CACHE", str(folder))
    return folder


@pytest.fixture
def data_recipe(make_recipe):
    """``data_recipe(train, **sections) -> Recipe``: conftest's factory, validated, for data that is prepared and never
    trained (the model path is never read)."""
    return lambda train, **sections: validate_recipe(make_recipe("unused", train, **sections))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def trained_text(tokenizer, row) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != -100])


QA = [{"prompt": f"colour {i}", "completion": f"answer {i}"} for i in range(12)]


# ----------------------------------------------------------------------------------------------------
# What the user meant


@pytest.mark.parametrize("name", ["qa.jsonl.gz", "qa.jsonl.bz2", "qa.jsonl.xz", "qa.json.gz", "qa.csv.gz"])
def test_compressed_data_files_are_read_as_what_they_hold(tokenizer, tmp_path, data_recipe, name):
    """A .jsonl / .json / .csv file compressed with gzip, bzip2 or xz (as data sets are shipped) gives the same
    prepared rows as the plain file, also streamed, instead of "not UTF-8 text"."""
    import bz2
    import gzip
    import lzma

    plain = tmp_path / name.rsplit(".", 1)[0]
    if plain.suffix == ".csv":
        with plain.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["prompt", "completion"])
            writer.writeheader()
            writer.writerows(QA)
    elif plain.suffix == ".json":
        plain.write_text(json.dumps(QA), encoding="utf-8")
    else:
        write_jsonl(plain, QA)
    packed = tmp_path / name
    codec = {".gz": gzip, ".bz2": bz2, ".xz": lzma}[packed.suffix]
    packed.write_bytes(codec.compress(plain.read_bytes()))
    expected = prepare_data(data_recipe(plain, data={"cache": False}), tokenizer)
    got = prepare_data(data_recipe(packed, data={"cache": False}), tokenizer)
    assert got.train["input_ids"] == expected.train["input_ids"] and got.train["labels"] == expected.train["labels"]
    streamed = prepare_data(data_recipe(packed, data={"streaming": True}, training={"max_steps": 2}), tokenizer)
    assert next(iter(streamed.train))["input_ids"] in expected.train["input_ids"]


def test_a_damaged_compressed_file_is_named_with_the_codecs_reason(tokenizer, tmp_path, data_recipe):
    """A .jsonl.gz cut short is one user error naming the file and that it cannot be decompressed."""
    import gzip

    packed = tmp_path / "qa.jsonl.gz"
    packed.write_bytes(gzip.compress(("\n".join(json.dumps(r) for r in QA)).encode())[:40])
    with pytest.raises(LorafitError, match="cannot be decompressed") as caught:
        prepare_data(data_recipe(packed), tokenizer)
    assert caught.value.where == str(packed)


def test_csv_fields_with_quoted_newlines_keep_them_and_numbers_stay_text(tokenizer, tmp_path, data_recipe):
    """A quoted CSV field holding newlines stays one field with its newlines; '007' is not turned into 7."""
    path = tmp_path / "qa.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "completion"])
        writer.writerow(["line one\nline two", "007"])
        writer.writerow(["plain", "first\nsecond"])
    prepared = prepare_data(data_recipe(path), tokenizer)
    assert prepared.report.train_examples == 2 and not prepared.report.dropped
    assert trained_text(tokenizer, prepared.train[0]).startswith("007")
    assert trained_text(tokenizer, prepared.train[1]).startswith("first\nsecond")
    assert "line one\nline two" in tokenizer.decode(prepared.train[0]["input_ids"])


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json"])
def test_a_byte_order_mark_before_the_header_or_json_is_skipped(tokenizer, tmp_path, suffix, data_recipe):
    """Files saved by Excel/Notepad start with a UTF-8 BOM; the first column name must not carry it."""
    path = tmp_path / f"bom{suffix}"
    if suffix == ".csv":
        text = "prompt,completion\nred,apple\nblue,sky\n"
    elif suffix == ".jsonl":
        text = "\n".join(json.dumps(r) for r in QA[:2])
    else:
        text = json.dumps(QA[:2])
    path.write_bytes(codecs.BOM_UTF8 + text.encode())
    prepared = prepare_data(data_recipe(path), tokenizer)
    assert prepared.report.format == "prompt-completion" and prepared.report.train_examples == 2


def test_a_json_file_that_wraps_its_rows_in_an_object_is_read(tokenizer, tmp_path, data_recipe):
    """{"data": [...]} (pretty-printed or on one line) is read from its one list of rows."""
    pretty = tmp_path / "wrapped.json"
    pretty.write_text(json.dumps({"version": 2, "data": QA[:5]}, indent=2))
    assert prepare_data(data_recipe(pretty), tokenizer).report.train_examples == 5
    one_line = tmp_path / "one_line.json"
    one_line.write_text(json.dumps({"data": QA[:3]}))
    assert prepare_data(data_recipe(one_line), tokenizer).report.train_examples == 3


def test_a_json_object_with_no_single_list_of_rows_is_named_precisely(tokenizer, tmp_path, data_recipe):
    """Two candidate lists: the error names both keys, not 'malformed JSON line'."""
    path = tmp_path / "two.json"
    path.write_text(json.dumps({"train": QA[:2], "test": QA[2:4]}, indent=2))
    with pytest.raises(LorafitError, match=r"several lists of rows \(train, test\)") as error:
        prepare_data(data_recipe(path), tokenizer)
    assert "malformed" not in str(error.value)


def test_chat_content_given_as_text_parts_is_accepted(tokenizer, tmp_path, data_recipe):
    """OpenAI-style content: [{"type": "text", "text": ...}] is the text of its parts."""
    rows = [{"messages": [{"role": "user", "content": [{"type": "text", "text": "red"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "apple"}]}]},
            {"messages": [{"role": "user", "content": "blue"}, {"role": "assistant", "content": "sky"}]}]
    prepared = prepare_data(data_recipe(write_jsonl(tmp_path / "parts.jsonl", rows)), tokenizer)
    assert prepared.report.train_examples == 2 and not prepared.report.dropped
    assert trained_text(tokenizer, prepared.train[0]) == "apple<|im_end|>\n"


def test_numbers_in_prompt_and_completion_columns_are_text(tokenizer, tmp_path, data_recipe):
    """A completion of 42 (a JSON number) is trained as the text "42", not dropped as malformed."""
    rows = [{"prompt": "6 x 7", "completion": 42}, {"prompt": 3.5, "completion": "half of seven"}]
    prepared = prepare_data(data_recipe(write_jsonl(tmp_path / "numbers.jsonl", rows)), tokenizer)
    assert prepared.report.train_examples == 2 and not prepared.report.dropped
    assert trained_text(tokenizer, prepared.train[0]) == "42<|im_end|>\n"


def test_special_token_text_inside_an_answer_is_not_trained_as_a_real_end_of_turn(tokenizer, tmp_path, data_recipe):
    """'<|im_end|>' written inside an answer would end the turn mid-answer: those rows are dropped and named."""
    rows = [*QA[:3], {"prompt": "how do turns end?", "completion": "with <|im_end|> and then more text"},
            QA[3], {"prompt": "and <|im_start|>?", "completion": "it starts one"}]
    prepared = prepare_data(data_recipe(write_jsonl(tmp_path / "special.jsonl", rows)), tokenizer)
    assert prepared.report.train_examples == 4
    notes = " ".join(prepared.report.warnings())
    assert "'<|im_end|>'" in notes and "row(s) 4" in notes and "'<|im_start|>'" in notes and "row(s) 6" in notes
    for row in prepared.train:  # every trained end-of-turn is the last trained token of its row
        labels = [label for label in row["labels"] if label != -100]
        assert labels.count(tokenizer.eos_token_id) == 1


def test_sharegpt_conversations_are_detected_and_only_the_gpt_turns_are_trained(tokenizer, tmp_path, data_recipe):
    """{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}]} needs no data.fields."""
    rows = [{"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "red"},
                               {"from": "gpt", "value": "apple"}, {"from": "human", "value": "blue"},
                               {"from": "gpt", "value": "sky"}]}] * 3
    prepared = prepare_data(data_recipe(write_jsonl(tmp_path / "sharegpt.jsonl", rows)), tokenizer)
    assert prepared.report.format == "messages" and prepared.report.train_examples == 3
    assert trained_text(tokenizer, prepared.train[0]) == "apple<|im_end|>\nsky<|im_end|>\n"
    assert "<|im_start|>system\nbe brief" in tokenizer.decode(prepared.train[0]["input_ids"])


def test_a_malformed_line_is_still_reported_as_file_and_line(tokenizer, tmp_path, data_recipe):
    """The Arrow reader's failure is traced back to the first bad line."""
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(QA[0]) + "\n" + json.dumps(QA[1]) + "\n{\"prompt\": oops}\n")
    with pytest.raises(LorafitError, match=r"bad.jsonl:3: malformed JSON line"):
        prepare_data(data_recipe(path), tokenizer)


# ----------------------------------------------------------------------------------------------------
# The cache


def test_a_second_preparation_is_read_from_the_cache_and_equals_the_first(tokenizer, tmp_path, own_cache, data_recipe):
    """Same inputs: the second call builds nothing and returns the same tokens, report and samples."""
    recipe = data_recipe(write_jsonl(tmp_path / "qa.jsonl", QA), data={"eval": 0.25})
    first = prepare_data(recipe, tokenizer)
    second = prepare_data(recipe, AutoTokenizer.from_pretrained(tokenizer.name_or_path))
    assert first.report.cache == "built" and second.report.cache == "from cache"
    assert second.report.summary().startswith("prepared 12 rows from cache " + str(own_cache))
    assert second.train.to_dict() == first.train.to_dict() and second.eval.to_dict() == first.eval.to_dict()
    assert (second.report.train_examples, second.report.eval_examples) == (9, 3)
    assert second.report.samples == first.report.samples and second.report.fingerprint == first.report.fingerprint
    entries = {p.name for p in own_cache.iterdir() if not p.name.endswith(".lock")}
    assert entries - {"hashes"} == {Path(first.report.cache_path).name, "raw"}  # one entry, datasets' raw copy
    assert not list(own_cache.glob("*.tmp-*"))  # nothing half-built left behind


def test_a_files_hash_is_reused_only_while_its_size_mtime_and_inode_are_unchanged(tokenizer, tmp_path, own_cache,
                                                                                  data_recipe):
    """The data files' sha256 is memoised by stat (a 1.4 GB file takes a second to hash): a settled, unchanged file
    is not read again; a rewrite (new mtime) is hashed again and is a cache miss; a file written in the last
    2 seconds is never memoised."""
    from lorafit import data_sources

    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    recipe = data_recipe(path)
    assert prepare_data(recipe, tokenizer).report.cache == "built"
    assert not (own_cache / "hashes").exists()  # just written: its mtime could still hide another write
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns - 10**10))
    assert prepare_data(recipe, tokenizer).report.cache == "from cache"
    assert len(list((own_cache / "hashes").glob("*.json"))) == 1
    reads = []
    real_open = Path.open
    monkey = pytest.MonkeyPatch()
    monkey.setattr(Path, "open", lambda self, *a, **k: reads.append(self) or real_open(self, *a, **k))
    try:
        assert data_sources.file_sha256(path, own_cache / "hashes") == data_sources.file_sha256(path)
    finally:
        monkey.undo()
    assert reads.count(path) == 1  # only the un-memoised call read the data file
    write_jsonl(path, [{**QA[0], "completion": "changed"}, *QA[1:]])
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns - 5 * 10**9))
    assert prepare_data(recipe, tokenizer).report.cache == "built"


def test_a_file_rewritten_in_place_with_its_mtime_restored_is_not_served_from_the_cache(tokenizer, tmp_path,
                                                                                       own_cache, data_recipe):
    """A data file rewritten in place to the same size with its mtime set back (what `cp -p`, `rsync -t` or an
    archive extraction do) keeps size, mtime and inode; its change time differs, so it is hashed again and the
    prepared data is built from the new rows, not read from the cache."""
    import time

    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    recipe = data_recipe(path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns - 10**10))
    old = path.stat()
    first = prepare_data(recipe, tokenizer)
    assert len(list((own_cache / "hashes").glob("*.json"))) == 1  # settled: its hash is memoised by stat
    time.sleep(0.05)  # the file system's clock tick: the rewrite below gets a later change time, as any later one does
    text = path.read_text()
    changed = text.replace(QA[0]["completion"], QA[0]["completion"][::-1], 1)
    assert changed != text and len(changed) == len(text)
    with path.open("r+", encoding="utf-8") as handle:  # in place: same inode
        handle.write(changed)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    now = path.stat()
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (old.st_size, old.st_mtime_ns, old.st_ino)
    second = prepare_data(recipe, tokenizer)
    assert second.report.cache == "built" and second.report.fingerprint != first.report.fingerprint


@pytest.mark.parametrize("case", ["file", "under a file", "lorafit cache is a file", "no permission"])
def test_an_unusable_cache_location_is_a_user_error_naming_the_variable(tokenizer, tmp_path, monkeypatch,
                                                                        data_recipe, case):
    """LORAFIT_DATA_CACHE (or LORAFIT_CACHE, which it defaults under) pointing at a file, below a file, or at a
    folder that cannot be written is one user error naming the variable and data.cache: false, never an internal
    error; the same data prepares with the cache off."""
    if case == "no permission" and os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    locked = tmp_path / "read-only"
    locked.mkdir(mode=0o500)
    variable, value = {"file": ("LORAFIT_DATA_CACHE", blocker), "under a file": ("LORAFIT_DATA_CACHE", blocker / "c"),
                       "lorafit cache is a file": ("LORAFIT_CACHE", blocker),
                       "no permission": ("LORAFIT_DATA_CACHE", locked)}[case]
    monkeypatch.delenv("LORAFIT_DATA_CACHE")
    monkeypatch.setenv(variable, str(value))
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    with pytest.raises(LorafitError) as caught:
        prepare_data(data_recipe(path), tokenizer)
    assert type(caught.value) is LorafitError and caught.value.where == f"{variable}={value}"
    assert "data.cache: false" in caught.value.hint
    assert prepare_data(data_recipe(path, data={"cache": False}), tokenizer).report.train_examples == 12


def test_the_hash_memo_writes_only_its_own_files(tmp_path):
    """The memo writes `<24-hex>.json` through a fresh temporary file: a user's file beside it stays, a file of
    another kind under the record's own name is neither trusted nor replaced, and no temporary file is left."""
    import hashlib

    from lorafit import data_sources

    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns - 10**10))
    memo = tmp_path / "hashes"
    memo.mkdir()
    beside = memo / "my-notes.txt"
    beside.write_text("keep me")
    foreign = memo / (hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:24] + ".json")
    foreign.write_text("[1, 2, 3]")  # valid JSON, not a memo
    truth = data_sources.file_sha256(path)
    assert data_sources.file_sha256(path, memo) == truth
    assert foreign.read_text() == "[1, 2, 3]" and beside.read_text() == "keep me"
    foreign.unlink()
    assert data_sources.file_sha256(path, memo) == truth
    assert json.loads(foreign.read_text())["sha256"] == truth  # now written, and only that
    assert sorted(p.name for p in memo.iterdir()) == sorted([beside.name, foreign.name])


@pytest.mark.parametrize("change", ["file", "max_length", "train_on", "system_prompt", "template", "fields",
                                    "seed", "tokenizer"])
def test_any_change_to_what_shapes_the_data_is_a_cache_miss(tokenizer, tmp_path, change, data_recipe):
    """Each fingerprint input, changed alone, makes the next preparation build again."""
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    base = {"data": {"eval": 0.25}, "template": {}, "training": {}}
    recipe = data_recipe(path, **base)
    assert prepare_data(recipe, tokenizer).report.cache == "built"
    assert prepare_data(recipe, AutoTokenizer.from_pretrained(tokenizer.name_or_path)).report.cache == "from cache"
    fresh = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    if change == "file":
        write_jsonl(path, QA[:-1])
    elif change == "tokenizer":
        fresh.add_tokens(["<extra>"])
    changed = {"max_length": {"data": {"eval": 0.25, "max_length": 16}},
               "train_on": {"template": {"train_on": "all"}},
               "system_prompt": {"template": {"system_prompt": "be brief"}},
               "template": {"template": {"name": "alpaca"}},
               "fields": {"data": {"eval": 0.25, "fields": {"prompt": "completion", "completion": "prompt"}}},
               "seed": {"training": {"seed": 7}}}.get(change, {})
    assert prepare_data(data_recipe(path, **{**base, **changed}), fresh).report.cache == "built"


@pytest.mark.parametrize("damage", ["truncate", "delete_manifest", "garbage_report"])
def test_a_damaged_cache_entry_is_rebuilt_not_trusted(tokenizer, tmp_path, damage, data_recipe):
    """A truncated Arrow file, a missing manifest or an unreadable report: the entry is built again. Removing the
    damaged entry touches only that entry: a user's file beside it in the cache folder stays."""
    recipe = data_recipe(write_jsonl(tmp_path / "qa.jsonl", QA))
    first = prepare_data(recipe, tokenizer)
    expected = first.train.to_dict()
    entry = Path(first.report.cache_path)
    beside = entry.parent / "my-notes.txt"
    beside.write_text("keep me")
    if damage == "truncate":
        arrow = next((entry / "rows").glob("*.arrow"))
        arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    elif damage == "delete_manifest":
        (entry / "manifest.json").unlink()
    else:
        (entry / "report.json").write_text("{not json")
    again = prepare_data(recipe, AutoTokenizer.from_pretrained(tokenizer.name_or_path))
    assert again.report.cache == "built"
    assert again.train.to_dict() == expected
    assert beside.read_text() == "keep me"


def test_cache_off_prepares_every_time_and_writes_nothing_to_the_cache(tokenizer, tmp_path, own_cache, data_recipe):
    """data.cache: false: nothing is stored or reused."""
    recipe = data_recipe(write_jsonl(tmp_path / "qa.jsonl", QA), data={"cache": False})
    assert prepare_data(recipe, tokenizer).report.cache == "off"
    assert prepare_data(recipe, tokenizer).report.cache == "off"
    assert not own_cache.exists() or not [p for p in own_cache.iterdir() if p.is_dir()]


def _prepare_in_child(args) -> str:
    cache, recipe_raw, tokenizer_dir = args
    os.environ["LORAFIT_DATA_CACHE"] = cache
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return prepare_data(validate_recipe(recipe_raw), tokenizer).report.cache


def test_two_processes_at_once_prepare_the_data_once(tiny_llama, tmp_path, own_cache, make_recipe):
    """Started together (as torchrun's ranks are), one process builds and the other waits and reads its entry."""
    path = write_jsonl(tmp_path / "qa.jsonl", QA * 50)
    raw = make_recipe("unused", path)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        states = pool.map(_prepare_in_child, [(str(own_cache), raw, str(tiny_llama))] * 2)
    assert sorted(states) == ["built", "from cache"]


# ----------------------------------------------------------------------------------------------------
# Mixing and eval rows


def _letters(tmp_path: Path, name: str, n: int) -> Path:
    return write_jsonl(tmp_path / f"{name}.jsonl", [{"prompt": f"{name} {i}", "completion": name} for i in range(n)])


def test_weighted_sources_mix_in_proportion_reproducibly_under_the_seed(tokenizer, tmp_path, data_recipe):
    """Weights 3:1 give ~75% rows from the first source, the same rows under the same seed, others under another."""
    a, b = _letters(tmp_path, "alpha", 400), _letters(tmp_path, "beta", 400)
    train = [{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}]
    prepared = prepare_data(data_recipe(train, data={"cache": False}), tokenizer)
    sources = prepared.report.sources
    share = sources[0]["rows"] / (sources[0]["rows"] + sources[1]["rows"])
    assert 0.70 < share < 0.80
    assert sources[0]["rows"] == 400  # sampling stops when a source runs out; no row is used twice
    assert sum(s["tokens"] for s in sources) == prepared.report.total_tokens
    again = prepare_data(data_recipe(train, data={"cache": False}), tokenizer)
    assert again.train["input_ids"] == prepared.train["input_ids"]
    other = prepare_data(data_recipe(train, data={"cache": False}, training={"seed": 1}), tokenizer)
    assert other.train["input_ids"] != prepared.train["input_ids"]


def test_a_cached_mix_with_held_out_rows_equals_the_built_one_and_holds_no_copy(tokenizer, tmp_path, own_cache,
                                                                                data_recipe):
    """Weighted sources, a held-out share and dropped rows: the cache entry gives back the same train and eval rows
    in the same order, and it stores the map's files once (no second copy of the selected sets)."""
    a, b = _letters(tmp_path, "alpha", 120), _letters(tmp_path, "beta", 120)
    empty = write_jsonl(tmp_path / "gaps.jsonl", [{"prompt": "x"}] * 5 + QA)  # 5 rows with no answer: dropped
    train = [{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}, {"path": str(empty), "weight": 1}]
    recipe = data_recipe(train, data={"eval": 0.2})
    built = prepare_data(recipe, tokenizer)
    cached = prepare_data(recipe, AutoTokenizer.from_pretrained(tokenizer.name_or_path))
    assert (built.report.cache, cached.report.cache) == ("built", "from cache")
    assert sum(built.report.dropped.values()) >= 5
    assert cached.train.to_dict() == built.train.to_dict() and cached.eval.to_dict() == built.eval.to_dict()
    entry = Path(built.report.cache_path)
    assert sorted(p.name for p in entry.iterdir()) == ["eval-rows.npy", "layout.json", "manifest.json", "report.json",
                                                        "rows", "train-rows.npy"]
    layout = json.loads((entry / "layout.json").read_text())
    assert len(layout["parts"]) == 3 and all(name.startswith("rows/") for part in layout["parts"] for name in part)


def test_a_cached_classification_set_equals_the_built_one(tokenizer, tmp_path, own_cache, data_recipe):
    """sequence-classification: rows with an empty text are dropped from train and eval alike, and the cache entry
    gives back the same rows, labels and counts."""
    rows = [{"text": f"{word} {i}", "label": word} for i in range(30) for word in ("yes", "no")]
    rows[3]["text"] = rows[40]["text"] = ""
    path = write_jsonl(tmp_path / "cls.jsonl", rows)
    recipe = data_recipe(path, task="sequence-classification", data={"eval": 0.25})
    built = prepare_classification_data(recipe, tokenizer)
    cached = prepare_classification_data(recipe, AutoTokenizer.from_pretrained(tokenizer.name_or_path))
    assert (built.report.cache, cached.report.cache) == ("built", "from cache")
    assert built.report.dropped == {"empty or missing text": 2} and built.labels == cached.labels == ["no", "yes"]
    assert built.report.train_examples + built.report.eval_examples == 58
    assert cached.train.to_dict() == built.train.to_dict() and cached.eval.to_dict() == built.eval.to_dict()
    assert cached.report.label_counts == built.report.label_counts


def test_each_source_keeps_its_own_format_and_fields(tokenizer, tmp_path, data_recipe):
    """A mix of a prompt/completion file and a ShareGPT file with renamed columns trains both."""
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"q": f"red {i}", "a": "apple"} for i in range(20)])
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"conversations": [{"from": "human", "value": "blue"},
                                                                     {"from": "gpt", "value": "sky"}]}] * 20)
    train = [{"path": str(qa), "fields": {"prompt": "q", "completion": "a"}}, {"path": str(chats)}]
    prepared = prepare_data(data_recipe(train), tokenizer)
    assert {s["format"] for s in prepared.report.sources} == {"prompt-completion", "messages"}
    answers = {trained_text(tokenizer, row) for row in prepared.train}
    assert answers == {"apple<|im_end|>\n", "sky<|im_end|>\n"}


def test_eval_rows_are_the_rows_training_held_out(tokenizer, tmp_path, data_recipe):
    """data.eval as a fraction: evaluate gets exactly the rows preparation kept out of training."""
    recipe = data_recipe(write_jsonl(tmp_path / "qa.jsonl", QA), data={"eval": 0.25})
    prepared = prepare_data(recipe, tokenizer)
    held = eval_rows(recipe)
    assert len(held.conversations) == prepared.report.eval_examples == 3
    trained_prompts = {tokenizer.decode(row["input_ids"]) for row in prepared.train}
    for messages in held.conversations:
        assert not any(messages[0]["content"] + "<|im_end|>" in text for text in trained_prompts)
    with pytest.raises(LorafitError, match="the recipe has no eval data"):
        eval_rows(data_recipe(tmp_path / "qa.jsonl"))


# ----------------------------------------------------------------------------------------------------
# Streaming


def test_streaming_reads_rows_on_the_fly_and_the_report_covers_the_first_rows(tokenizer, tmp_path, data_recipe):
    """data.streaming: an IterableDataset of the same tokens, and a lint of the first rows."""
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    streamed = prepare_data(data_recipe(path, data={"streaming": True}, training={"max_steps": 2}), tokenizer)
    whole = prepare_data(data_recipe(path), tokenizer)
    from datasets import IterableDataset

    assert isinstance(streamed.train, IterableDataset) and streamed.report.streamed
    assert [row["input_ids"] for row in streamed.train] == whole.train["input_ids"]
    assert streamed.report.train_examples == 12 and streamed.report.eos_trained


def test_streaming_needs_max_steps_and_no_held_out_fraction(tmp_path, data_recipe):
    """A stream has no length: the recipe says what to set instead."""
    with pytest.raises(Exception, match="training.max_steps"):
        data_recipe(tmp_path / "x.jsonl", data={"streaming": True})
    with pytest.raises(Exception, match="a fraction cannot be held out of a stream"):
        data_recipe(tmp_path / "x.jsonl", data={"streaming": True, "eval": 0.1}, training={"max_steps": 2})


@pytest.mark.parametrize("packing", [False, True])
def test_a_streamed_run_trains(tiny_llama, tmp_path, packing):
    """Training from a stream takes max_steps steps, lowers the loss and exports an adapter."""
    from rich.console import Console

    from lorafit.train import run_train

    rows = [{"prompt": f"Color: {c}", "completion": t} for c, t in [("red", "apple"), ("blue", "sky")]] * 40
    raw = {"name": "s", "model": {"path": str(tiny_llama)}, "adapter": {"r": 8, "dropout": 0.0},
           "data": {"train": str(write_jsonl(tmp_path / "qa.jsonl", rows)), "streaming": True, "max_length": 32,
                    "packing": packing},
           "training": {"max_steps": 6, "batch_size": 4, "grad_accum": 1, "learning_rate": 1e-2, "logging_steps": 1,
                        "warmup_ratio": 0.0, "scheduler": "constant"},
           "output": {"dir": str(tmp_path / "run"), "report_to": ["none"]}}
    result = run_train(validate_recipe(raw), Console(quiet=True))
    assert result.metrics.global_step == 6
    losses = [e["loss"] for e in result.metrics.loss_history if "loss" in e]
    assert losses[-1] < losses[0]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").exists()
    assert data_cache.data_cache_dir() == Path(os.environ["LORAFIT_DATA_CACHE"])


def test_stale_build_cleanup_removes_only_this_hosts_dead_builds(own_cache):
    """Reaping half-built entries touches only lorafit's own build folders of this host whose process is gone: a
    user folder with a similar name and another node's build (shared cache) are left alone."""
    import socket

    dead = _a_dead_pid()
    host = socket.gethostname()
    own_dead = own_cache / f"{'a' * 24}.tmp-{host}-{dead}"
    own_live = own_cache / f"{'b' * 24}.tmp-{host}-{os.getpid()}"
    other_node = own_cache / f"{'c' * 24}.tmp-another-node-{dead}"
    user_folder = own_cache / f"notes.tmp-{dead}"
    for folder in (own_dead, own_live, other_node, user_folder):
        folder.mkdir(parents=True)
        (folder / "keep.txt").write_text("x")
    data_cache.remove_stale_builds()
    assert not own_dead.exists()
    assert (own_live / "keep.txt").exists() and (other_node / "keep.txt").exists()
    assert (user_folder / "keep.txt").exists()


def _a_dead_pid() -> int:
    import subprocess

    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid
