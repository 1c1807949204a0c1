"""Tests for pipeline.data: parsing, every loader, the errors on bad input, auto-detection, prompt sets."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import data
from pipeline.data import (BUILTIN_PROMPTS, PAIRS_SCHEMA, PROMPTS_SCHEMA, builtin_prompts, load_hf_pairs, load_hh,
                           load_llmbar, load_pairs_file, load_preference_data, load_prompts, messages_column,
                           parse_hh_transcript, split_prompts)

DATA_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
HH_FILE = DATA_DIR / "hh_harmless_base_test.jsonl"
NATURAL_FILE = DATA_DIR / "llmbar" / "Natural.json"
needs_real_data = pytest.mark.skipif(not HH_FILE.exists() or not NATURAL_FILE.exists(),
                                     reason=f"real preference data not found at {DATA_DIR.resolve()}")

TRANSCRIPT = ("\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And times 3?\n\nAssistant: 12, since 4 x 3 = 12.")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def hh_row(prompt_turns: str, chosen: str, rejected: str) -> dict:
    return {"chosen": f"{prompt_turns}\n\nAssistant: {chosen}", "rejected": f"{prompt_turns}\n\nAssistant: {rejected}"}


# ---------------------------------------------------------------------------------------------- HH

def test_parse_hh_transcript_multi_turn():
    assert parse_hh_transcript(TRANSCRIPT) == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And times 3?"},
        {"role": "assistant", "content": "12, since 4 x 3 = 12."},
    ]


def test_parse_hh_transcript_tolerates_surrounding_whitespace():
    assert parse_hh_transcript("  " + TRANSCRIPT.lstrip() + "\n \n") == parse_hh_transcript(TRANSCRIPT)


def test_parse_hh_transcript_rejects_text_not_starting_with_human():
    with pytest.raises(ValueError, match="must start with 'Human:'"):
        parse_hh_transcript("\n\nAssistant: hello")


def test_load_hh_skips_and_reports_differing_prompts_and_empty_responses(tmp_path):
    path = write_jsonl(tmp_path / "tiny_hh.jsonl", [
        hh_row("\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a color.", "Blue.", "I won't."),
        {"chosen": "\n\nHuman: Hi\n\nAssistant: A", "rejected": "\n\nHuman: Hey\n\nAssistant: B"},
        hh_row("\n\nHuman: Hi", "Hello.", ""),
    ])
    table, skipped = load_hh(path)
    assert table.schema == PAIRS_SCHEMA
    assert table.to_pylist() == [{
        "pair_id": "tiny_hh:0", "subset": "tiny_hh",
        "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                   {"role": "user", "content": "Name a color."}],
        "chosen": "Blue.", "rejected": "I won't.",
    }]
    assert len(skipped) == 2
    assert skipped[0].startswith("tiny_hh:1:") and "differ" in skipped[0]
    assert skipped[1].startswith("tiny_hh:2:") and "empty rejected" in skipped[1]


def test_load_hh_malformed_transcript_names_the_pair(tmp_path):
    path = write_jsonl(tmp_path / "bad_hh.jsonl", [{"chosen": "Assistant: hi", "rejected": "Assistant: yo"}])
    with pytest.raises(ValueError, match="bad_hh:0.*must start with 'Human:'"):
        load_hh(path)


@needs_real_data
def test_load_hh_real_file_counts():
    rows = [json.loads(line) for line in HH_FILE.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2312

    def prompt_of(transcript: str) -> list[dict]:
        messages = parse_hh_transcript(transcript)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return messages[:last]

    shared = sum(prompt_of(row["chosen"]) == prompt_of(row["rejected"]) for row in rows)
    assert shared == 2307

    table, skipped = load_hh(HH_FILE)
    assert table.schema == PAIRS_SCHEMA
    assert table.num_rows + len(skipped) == 2312
    differ = [r for r in skipped if "differ" in r]
    empty = [r for r in skipped if "empty" in r]
    assert len(differ) == 5 and len(differ) + len(empty) == len(skipped)
    assert len(set(table.column("pair_id").to_pylist())) == table.num_rows
    assert set(table.column("subset").to_pylist()) == {"hh_harmless_base_test"}
    assert all(prompt[-1]["role"] == "user" for prompt in table.column("prompt").to_pylist())


# ---------------------------------------------------------------------------------------------- LLMBar

def write_llmbar(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def test_load_llmbar_maps_label_to_chosen(tmp_path):
    path = write_llmbar(tmp_path / "Tiny.json", [
        {"input": "Say hi.", "output_1": "hi", "output_2": "bye", "label": 1},
        {"input": "Add 1+1.", "output_1": "3", "output_2": "2", "label": 2},
    ])
    table, skipped = load_llmbar(path)
    assert table.schema == PAIRS_SCHEMA and skipped == []
    assert table.to_pylist() == [
        {"pair_id": "Tiny:0", "subset": "Tiny", "prompt": [{"role": "user", "content": "Say hi."}],
         "chosen": "hi", "rejected": "bye"},
        {"pair_id": "Tiny:1", "subset": "Tiny", "prompt": [{"role": "user", "content": "Add 1+1."}],
         "chosen": "2", "rejected": "3"},
    ]


def test_load_llmbar_bad_label_names_row_and_field(tmp_path):
    path = write_llmbar(tmp_path / "Bad.json", [
        {"input": "x", "output_1": "a", "output_2": "b", "label": 1},
        {"input": "y", "output_1": "a", "output_2": "b", "label": 3},
    ])
    with pytest.raises(ValueError, match=r"row 1: field `label` must be 1 or 2.*got 3"):
        load_llmbar(path)


def test_load_llmbar_folder_loads_every_file_as_a_subset(tmp_path):
    write_llmbar(tmp_path / "B.json", [{"input": "x", "output_1": "a", "output_2": "b", "label": 2}])
    write_llmbar(tmp_path / "A.json", [{"input": "y", "output_1": "c", "output_2": " ", "label": 1},
                                       {"input": "z", "output_1": "c", "output_2": "d", "label": 1}])
    table, skipped = load_llmbar(tmp_path)
    assert table.schema == PAIRS_SCHEMA
    assert table.column("pair_id").to_pylist() == ["A:1", "B:0"]
    assert table.column("subset").to_pylist() == ["A", "B"]
    assert skipped == ["A:0: skipped: empty `output_2`"]


@needs_real_data
def test_load_llmbar_real_natural():
    table, skipped = load_llmbar(NATURAL_FILE)
    rows = json.loads(NATURAL_FILE.read_text(encoding="utf-8"))
    assert table.schema == PAIRS_SCHEMA and table.num_rows == 100 and skipped == []
    for pair, row in zip(table.to_pylist(), rows):
        assert pair["chosen"] == row[f"output_{row['label']}"]
        assert pair["rejected"] == row[f"output_{3 - row['label']}"]
        assert pair["prompt"] == [{"role": "user", "content": row["input"]}]
    assert set(table.column("subset").to_pylist()) == {"Natural"}


# ---------------------------------------------------------------------------------------------- generic

def test_pairs_jsonl_with_string_prompt(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}])
    table = load_pairs_file(path)
    assert table.schema == PAIRS_SCHEMA
    assert table.to_pylist() == [{"pair_id": "mine:0", "subset": "mine", "prompt": [{"role": "user", "content": "Hi?"}],
                                  "chosen": "Hello!", "rejected": "Go away."}]


def test_pairs_jsonl_with_message_list_prompt_and_subset(tmp_path):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": prompt, "chosen": "Paris.", "rejected": "Rome.",
                                                  "subset": "geo"}])
    table = load_pairs_file(path)
    assert table.schema == PAIRS_SCHEMA
    assert table.to_pylist()[0] == {"pair_id": "chat:0", "subset": "geo", "prompt": prompt,
                                    "chosen": "Paris.", "rejected": "Rome."}


def test_pairs_parquet(tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": ["a?", "b?"], "chosen": ["A", "B"], "rejected": ["x", "y"]}), path)
    table = load_pairs_file(path)
    assert table.schema == PAIRS_SCHEMA
    assert table.column("pair_id").to_pylist() == ["pairs:0", "pairs:1"]
    assert table.column("chosen").to_pylist() == ["A", "B"]


def test_pairs_missing_column_names_column_file_and_fix(tmp_path):
    path = write_jsonl(tmp_path / "nochosen.jsonl", [{"prompt": "p", "rejected": "r"}])
    with pytest.raises(ValueError, match=r"nochosen\.jsonl: no `chosen` column \(columns present: prompt, "
                                         r"rejected\)\. Fix: add a `chosen` column"):
        load_pairs_file(path)


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
def test_pairs_empty_field_names_row_and_field(tmp_path, field):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c", "rejected": "r"}]
    rows[1][field] = "  "
    path = write_jsonl(tmp_path / "empty.jsonl", rows)
    with pytest.raises(ValueError, match=f"row 1: field `{field}` is empty"):
        load_pairs_file(path)


def test_pairs_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_pairs_file(tmp_path / "nowhere.jsonl")


def test_pairs_malformed_json_line_names_line_number(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.jsonl: bad JSON on line 2"):
        load_pairs_file(path)


# ---------------------------------------------------------------------------------------------- Hugging Face

def test_hf_unreachable_says_so_and_suggests_local_file(monkeypatch):
    import datasets

    def offline(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match=r"cannot reach the Hugging Face Hub.*--format pairs"):
        load_hf_pairs("someorg/somedata")


def test_hf_generic_and_hh_columns(monkeypatch):
    import datasets

    generic = datasets.Dataset.from_list([{"prompt": "q", "chosen": "good", "rejected": "bad", "subset": "s1"}])
    hh = datasets.Dataset.from_list([hh_row("\n\nHuman: q", "good", "bad")])
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: generic if name == "org/generic" else hh)

    table, skipped = load_hf_pairs("org/generic")
    assert table.schema == PAIRS_SCHEMA and skipped == []
    assert table.to_pylist()[0] == {"pair_id": "org/generic:test:0", "subset": "s1",
                                    "prompt": [{"role": "user", "content": "q"}], "chosen": "good", "rejected": "bad"}
    table, skipped = load_preference_data("org/hh", split="train")
    assert table.schema == PAIRS_SCHEMA and skipped == []
    assert table.to_pylist()[0]["pair_id"] == "org/hh:train:0"
    assert table.to_pylist()[0]["chosen"] == "good"


# ---------------------------------------------------------------------------------------------- dispatch

def test_auto_detection(tmp_path):
    hh = write_jsonl(tmp_path / "hh.jsonl", [hh_row("\n\nHuman: q", "good", "bad")])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"}])
    llmbar = write_llmbar(tmp_path / "Set.json",
                          [{"input": "q", "output_1": "bad", "output_2": "good", "label": 2}])
    assert data.detect_format(hh) == "hh"
    assert data.detect_format(pairs) == "pairs"
    assert data.detect_format(llmbar) == "llmbar"
    assert data.detect_format(tmp_path) == "llmbar"
    assert data.detect_format("someorg/some-data") == "hf"
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        data.detect_format(tmp_path / "missing.jsonl")
    for path in (hh, pairs, llmbar):
        table, _ = load_preference_data(path)
        assert table.schema == PAIRS_SCHEMA
        assert table.to_pylist()[0]["chosen"] == "good" and table.to_pylist()[0]["rejected"] == "bad"


def test_explicit_format_and_unknown_format(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "q", "chosen": "good", "rejected": "bad"}])
    assert load_preference_data(pairs, fmt="pairs")[0].num_rows == 1
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        load_preference_data(pairs, fmt="csv")


# ---------------------------------------------------------------------------------------------- prompts

def test_messages_column_type():
    column = messages_column([[{"role": "user", "content": "hi"}], []])
    assert column.type == PROMPTS_SCHEMA.field("prompt").type == PAIRS_SCHEMA.field("prompt").type


def test_builtin_prompts():
    table = builtin_prompts()
    assert table.schema == PROMPTS_SCHEMA
    assert table.num_rows == len(BUILTIN_PROMPTS) >= 60
    assert len(set(BUILTIN_PROMPTS)) == len(BUILTIN_PROMPTS)
    assert table.column("prompt_id").to_pylist()[:2] == ["builtin:0", "builtin:1"]
    assert all(p == [{"role": "user", "content": text}]
               for p, text in zip(table.column("prompt").to_pylist(), BUILTIN_PROMPTS))
    assert load_prompts("builtin").equals(table)


def test_split_prompts_is_deterministic_and_disjoint():
    table = builtin_prompts()
    train, heldout = split_prompts(table, heldout_fraction=0.25, seed=7)
    again_train, again_heldout = split_prompts(table, heldout_fraction=0.25, seed=7)
    assert train.equals(again_train) and heldout.equals(again_heldout)
    assert train.schema == heldout.schema == PROMPTS_SCHEMA
    assert heldout.num_rows == 16 and train.num_rows == len(BUILTIN_PROMPTS) - 16
    train_ids, heldout_ids = train.column("prompt_id").to_pylist(), heldout.column("prompt_id").to_pylist()
    assert not set(train_ids) & set(heldout_ids)
    assert split_prompts(table, 0.25, seed=8)[1].column("prompt_id").to_pylist() != heldout_ids
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_prompts(table, 1.0, seed=0)


def test_load_prompts_from_prompt_file_and_from_pairs(tmp_path):
    prompt_file = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "Say hi."}, {"prompt": [{"role": "user", "content": "Count to 3."}]}, {"prompt": "Say hi."}])
    table = load_prompts(prompt_file)
    assert table.schema == PROMPTS_SCHEMA
    assert table.column("prompt_id").to_pylist() == ["prompts:0", "prompts:1"]

    hh = write_jsonl(tmp_path / "hh.jsonl", [hh_row("\n\nHuman: q1", "a", "b"), hh_row("\n\nHuman: q2", "a", "b")])
    table = load_prompts(hh)
    assert table.schema == PROMPTS_SCHEMA
    assert table.to_pylist() == [{"prompt_id": "hh:0", "prompt": [{"role": "user", "content": "q1"}]},
                                 {"prompt_id": "hh:1", "prompt": [{"role": "user", "content": "q2"}]}]


def test_load_prompts_empty_prompt_names_row(tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "ok"}, {"prompt": ""}])
    with pytest.raises(ValueError, match="row 1: field `prompt` is empty"):
        load_prompts(path)


def test_split_prompts_with_an_empty_side():
    # regression: table.take([]) has type null and pyarrow refused it
    train, heldout = split_prompts(builtin_prompts().slice(0, 3), 0.0, seed=0)
    assert train.num_rows == 3 and heldout.num_rows == 0 and heldout.schema == PROMPTS_SCHEMA
