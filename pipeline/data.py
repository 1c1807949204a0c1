"""Preference pairs and prompt sets as Arrow tables, with one schema each.

Every pair loader returns a table with exactly PAIRS_SCHEMA:

    pair_id   string                          stable id "<source>:<row index>", e.g. "Natural:17"
    subset    string                          e.g. "hh_harmless_base_test", "Natural", or a file's `subset` column
    prompt    list<struct<role, content>>     the chat messages before the response
    chosen    string                          the preferred assistant response text
    rejected  string                          the other assistant response text

Sources (all read by `load_preference_data`, which picks one with fmt="auto"):

    hh      Anthropic HH-RLHF .jsonl: `chosen` and `rejected` are whole "\\n\\nHuman: ...\\n\\nAssistant: ..."
            transcripts. Pairs whose transcripts differ before the last assistant turn, or whose response is
            empty, are skipped and reported.
    llmbar  LLMBar .json list of `input`, `output_1`, `output_2`, `label` (1 or 2 = the better output), or a
            folder of them (one subset per file). Pairs with an empty output are skipped and reported.
    pairs   any .jsonl / .json / .parquet with `prompt` (a string or a list of {role, content} messages),
            `chosen`, `rejected` and an optional `subset`. Strict: a bad row raises, nothing is skipped.
    hf      a Hugging Face dataset name ("org/name"), with generic or HH-style columns.

Prompt sets for RL have PROMPTS_SCHEMA (prompt_id, prompt); `load_prompts` reads them from a prompt file or
takes the prompts of any pair source, and `builtin_prompts` needs no file at all.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES_TYPE = pa.list_(MESSAGE_TYPE)

PAIRS_SCHEMA = pa.schema([
    ("pair_id", pa.string()),     # stable id: "<source file stem>:<row index>"
    ("subset", pa.string()),      # e.g. "hh_harmless_base_test", "Natural", or the `subset` column of a generic file
    ("prompt", MESSAGES_TYPE),    # chat messages before the response
    ("chosen", pa.string()),      # the preferred assistant response text
    ("rejected", pa.string()),    # the other assistant response text
])

PROMPTS_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),   # stable id: "<source>:<row index>"
    ("prompt", MESSAGES_TYPE),    # chat messages the policy answers
])

Messages = list[dict[str, str]]
Format = Literal["auto", "hh", "llmbar", "pairs", "hf"]

HF_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")
HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


# ----------------------------------------------------------------------------------------------------------
# table building

def messages_column(message_lists: list[Messages]) -> pa.Array:
    """An Arrow array of chat message lists, typed list<struct<role, content>>: the one place it is built."""
    return pa.array(message_lists, type=MESSAGES_TYPE)


def pairs_table(pairs: list[dict[str, Any]]) -> pa.Table:
    """A PAIRS_SCHEMA table from dicts with keys pair_id, subset, prompt, chosen, rejected."""
    return pa.Table.from_arrays([
        pa.array([p["pair_id"] for p in pairs], type=pa.string()),
        pa.array([p["subset"] for p in pairs], type=pa.string()),
        messages_column([p["prompt"] for p in pairs]),
        pa.array([p["chosen"] for p in pairs], type=pa.string()),
        pa.array([p["rejected"] for p in pairs], type=pa.string()),
    ], schema=PAIRS_SCHEMA)


def prompts_table(prompt_ids: list[str], prompts: list[Messages]) -> pa.Table:
    """A PROMPTS_SCHEMA table."""
    return pa.Table.from_arrays([pa.array(prompt_ids, type=pa.string()), messages_column(prompts)],
                                schema=PROMPTS_SCHEMA)


# ----------------------------------------------------------------------------------------------------------
# reading records from files

def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .jsonl, .json (a list of objects) or .parquet file as dicts; errors name the path and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    if path.suffix == ".parquet":
        return _read_parquet(path)
    if path.suffix == ".json":
        return _read_json_list(path)
    return _read_jsonl(path)


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowInvalid, OSError) as err:
        raise ValueError(f"{path}: not a readable parquet file ({err})") from err


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: bad JSON at line {err.lineno}, column {err.colno}: {err.msg}") from err
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{path}: a .json data file must hold a list of objects, one per row")
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: bad JSON on line {line_number}: {err.msg} (column {err.colno})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{path}: line {line_number} is not a JSON object")
            rows.append(row)
    return rows


def require_columns(records: list[dict[str, Any]], columns: list[str], source: str) -> None:
    """Raise a ValueError naming the first missing column, the source, the columns present and the fix."""
    if not records:
        raise ValueError(f"{source}: no rows")
    present = sorted({key for row in records for key in row})
    for column in columns:
        if column not in present:
            raise ValueError(f"{source}: no `{column}` column (columns present: {', '.join(present)}). "
                             f"Fix: add a `{column}` column to every row.")


# ----------------------------------------------------------------------------------------------------------
# field checks for generic rows

def text_field(row: dict[str, Any], field: str, row_index: int, source: str) -> str:
    """A non-empty string field of a row; a message list counts as its last message's content."""
    value = row.get(field)
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        value = value[-1].get("content")
    if not isinstance(value, str):
        raise ValueError(f"{source}: row {row_index}: field `{field}` must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{source}: row {row_index}: field `{field}` is empty")
    return value


def prompt_field(row: dict[str, Any], row_index: int, source: str) -> Messages:
    """The `prompt` of a row as messages: a string becomes one user message."""
    value = row.get("prompt")
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise ValueError(f"{source}: row {row_index}: field `prompt` must be a string or a list of "
                         f"{{role, content}} messages, got {type(value).__name__}")
    for message in value:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ValueError(f"{source}: row {row_index}: field `prompt` has a message that is not "
                             f"{{\"role\": str, \"content\": str}}: {message!r}")
    if not any(m["content"].strip() for m in value):
        raise ValueError(f"{source}: row {row_index}: field `prompt` is empty")
    return [{"role": m["role"], "content": m["content"]} for m in value]


# ----------------------------------------------------------------------------------------------------------
# Anthropic HH-RLHF transcripts

def parse_hh_transcript(text: str) -> Messages:
    """Split "\\n\\nHuman: ...\\n\\nAssistant: ..." into [{"role": "user"|"assistant", "content": ...}]."""
    stripped = text.strip()
    if not stripped.startswith("Human:"):
        raise ValueError(f"an HH transcript must start with 'Human:', this one starts with {stripped[:40]!r}")
    parts = HH_TURN.split("\n\n" + stripped)  # ["", speaker, text, speaker, text, ...]
    speakers, contents = parts[1::2], parts[2::2]
    return [{"role": HH_ROLES[s], "content": c.strip()} for s, c in zip(speakers, contents)]


def _split_last_assistant(messages: Messages) -> tuple[Messages, str]:
    """(messages before the last assistant turn, that turn's content)."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("the transcript has no 'Assistant:' turn")
    return messages[:last], messages[last]["content"]


def _hh_pair(row: dict[str, Any], pair_id: str, subset: str) -> tuple[dict[str, Any] | None, str]:
    """(pair, "") or (None, reason it is skipped) for one HH row. Malformed transcripts raise."""
    for field in ("chosen", "rejected"):
        if not isinstance(row.get(field), str):
            raise ValueError(f"{pair_id}: field `{field}` must be an HH transcript string, got "
                             f"{type(row.get(field)).__name__}")
    try:
        prompt, chosen = _split_last_assistant(parse_hh_transcript(row["chosen"]))
        rejected_prompt, rejected = _split_last_assistant(parse_hh_transcript(row["rejected"]))
    except ValueError as err:
        raise ValueError(f"{pair_id}: not an HH transcript pair: {err}") from err
    if prompt != rejected_prompt:
        return None, "chosen and rejected differ before the last assistant turn (no shared prompt)"
    if not chosen:
        return None, "empty chosen response"
    if not rejected:
        return None, "empty rejected response"
    return {"pair_id": pair_id, "subset": subset, "prompt": prompt, "chosen": chosen, "rejected": rejected}, ""


def _hh_pairs(records: list[dict[str, Any]], stem: str, subset: str) -> tuple[pa.Table, list[str]]:
    pairs, skipped = [], []
    for i, row in enumerate(records):
        pair_id = f"{stem}:{i}"
        pair, reason = _hh_pair(row, pair_id, row.get("subset") or subset)
        if pair is None:
            skipped.append(f"{pair_id}: skipped: {reason}")
        else:
            pairs.append(pair)
    return pairs_table(pairs), skipped


def load_hh(path: str | Path) -> tuple[pa.Table, list[str]]:
    """HH-RLHF pairs: prompt = turns before chosen's last assistant turn. Returns (table, skipped reports)."""
    path = Path(path)
    records = read_records(path)
    require_columns(records, ["chosen", "rejected"], str(path))
    return _hh_pairs(records, path.stem, path.stem)


def _is_hh_row(row: dict[str, Any]) -> bool:
    return ("prompt" not in row and all(isinstance(row.get(k), str) and row[k].lstrip().startswith("Human:")
                                        for k in ("chosen", "rejected")))


# ----------------------------------------------------------------------------------------------------------
# LLMBar

def _llmbar_pair(row: dict[str, Any], row_index: int, path: Path) -> tuple[dict[str, Any] | None, str]:
    """(pair, "") or (None, reason it is skipped) for one LLMBar row; a bad label raises."""
    label = row.get("label")
    if isinstance(label, bool) or label not in (1, 2):
        raise ValueError(f"{path}: row {row_index}: field `label` must be 1 or 2 (which output is better), "
                         f"got {label!r}")
    better, worse = ("output_1", "output_2") if label == 1 else ("output_2", "output_1")
    for field in ("input", "output_1", "output_2"):
        if not isinstance(row.get(field), str):
            raise ValueError(f"{path}: row {row_index}: field `{field}` must be a string, got "
                             f"{type(row.get(field)).__name__}")
        if not row[field].strip():
            return None, f"empty `{field}`"
    prompt = [{"role": "user", "content": row["input"]}]
    return {"pair_id": f"{path.stem}:{row_index}", "subset": path.stem, "prompt": prompt,
            "chosen": row[better], "rejected": row[worse]}, ""


def _load_llmbar_file(path: Path) -> tuple[pa.Table, list[str]]:
    records = read_records(path)
    require_columns(records, ["input", "output_1", "output_2", "label"], str(path))
    pairs, skipped = [], []
    for i, row in enumerate(records):
        pair, reason = _llmbar_pair(row, i, path)
        if pair is None:
            skipped.append(f"{path.stem}:{i}: skipped: {reason}")
        else:
            pairs.append(pair)
    return pairs_table(pairs), skipped


def load_llmbar(path: str | Path) -> tuple[pa.Table, list[str]]:
    """LLMBar pairs from one .json file or every .json in a folder (sorted), subset = file stem."""
    path = Path(path)
    if not path.is_dir():
        return _load_llmbar_file(path)
    files = sorted(path.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"{path}: folder holds no .json LLMBar files")
    loaded = [_load_llmbar_file(f) for f in files]
    return pa.concat_tables([t for t, _ in loaded]), [r for _, reports in loaded for r in reports]


# ----------------------------------------------------------------------------------------------------------
# generic pair files and Hugging Face datasets

def _generic_pairs(records: list[dict[str, Any]], stem: str, subset: str, source: str) -> pa.Table:
    require_columns(records, ["prompt", "chosen", "rejected"], source)
    pairs = []
    for i, row in enumerate(records):
        pairs.append({
            "pair_id": f"{stem}:{i}",
            "subset": str(row.get("subset") or subset),
            "prompt": prompt_field(row, i, source),
            "chosen": text_field(row, "chosen", i, source),
            "rejected": text_field(row, "rejected", i, source),
        })
    return pairs_table(pairs)


def load_pairs_file(path: str | Path) -> pa.Table:
    """Pairs from a .jsonl/.json/.parquet with prompt, chosen, rejected[, subset]. Strict: bad rows raise."""
    path = Path(path)
    return _generic_pairs(read_records(path), path.stem, path.stem, str(path))


def load_hf_pairs(name: str, split: str = "test") -> tuple[pa.Table, list[str]]:
    """Pairs from a Hugging Face dataset with generic (prompt/chosen/rejected) or HH-style columns."""
    import datasets  # imported here: it is slow to import and only this source needs it

    try:
        records = datasets.load_dataset(name, split=split).to_list()
    except ConnectionError as err:
        raise ConnectionError(
            f"cannot reach the Hugging Face Hub to load dataset {name!r} ({err}). Fix: on a machine with "
            f"access, save the {split!r} split to a local .jsonl or .parquet file (columns prompt, chosen, "
            f"rejected) and pass that path with --format pairs.") from err
    source, stem = f"Hugging Face dataset {name!r} split {split!r}", f"{name}:{split}"
    if records and "prompt" not in records[0] and _is_hh_row(records[0]):
        return _hh_pairs(records, stem, name)
    return _generic_pairs(records, stem, name, source), []


# ----------------------------------------------------------------------------------------------------------
# dispatch

def detect_format(path_or_name: str | Path) -> Format:
    """Guess the format: a folder or a .json list with `output_1` -> llmbar; a .jsonl/.parquet whose first
    row holds HH transcripts -> hh; another file -> pairs; an absent "org/name" -> hf."""
    path = Path(path_or_name)
    if path.is_dir():
        return "llmbar"
    if not path.exists():
        if HF_NAME.match(str(path_or_name)):
            return "hf"
        raise FileNotFoundError(f"no such data file or folder: {path} (nor an 'org/name' Hugging Face dataset)")
    records = read_records(path)
    first = records[0] if records else {}
    if path.suffix == ".json" and "output_1" in first:
        return "llmbar"
    if _is_hh_row(first):
        return "hh"
    return "pairs"


def load_preference_data(path_or_name: str | Path, fmt: Format = "auto",
                         split: str = "test") -> tuple[pa.Table, list[str]]:
    """Pairs from any source as (PAIRS_SCHEMA table, skipped-pair reports); `split` is for fmt="hf" only."""
    if fmt == "auto":
        fmt = detect_format(path_or_name)
    if fmt == "hh":
        return load_hh(path_or_name)
    if fmt == "llmbar":
        return load_llmbar(path_or_name)
    if fmt == "pairs":
        return load_pairs_file(path_or_name), []
    if fmt == "hf":
        return load_hf_pairs(str(path_or_name), split=split)
    raise ValueError(f"unknown data format {fmt!r}; use one of auto, hh, llmbar, pairs, hf")


# ----------------------------------------------------------------------------------------------------------
# prompt sets for RL

BUILTIN_PROMPTS = [
    "Give three tips for sleeping better.",
    "Explain what a rainbow is to a child.",
    "Write a two-line poem about the sea.",
    "What is the difference between weather and climate?",
    "Suggest a name for a friendly orange cat.",
    "List four fruits that are high in vitamin C.",
    "How do I boil an egg?",
    "Write a short thank-you note to a teacher.",
    "Why do leaves change color in autumn?",
    "Give me a simple recipe for a tomato salad.",
    "What are two benefits of drinking water?",
    "Describe a sunny morning in one sentence.",
    "Explain what a computer program is in simple words.",
    "Name three animals that live in the ocean.",
    "How can I stay focused while studying?",
    "Write a haiku about winter.",
    "What does a bee do all day?",
    "Give three ideas for a rainy-day activity at home.",
    "Explain why the sky looks blue.",
    "How do plants make their food?",
    "Write a friendly greeting for a new neighbor.",
    "What is a good way to start learning to cook?",
    "Tell me a fun fact about the moon.",
    "Summarize the story of the tortoise and the hare in two sentences.",
    "What should I pack for a day at the beach?",
    "Explain what recycling is and why it helps.",
    "Give me three words that rhyme with 'light'.",
    "How do I write a good to-do list?",
    "What is the boiling point of water at sea level?",
    "Suggest a short stretching routine for the morning.",
    "Describe the taste of a lemon.",
    "Why is exercise good for the heart?",
    "Write a one-sentence story about a lost key.",
    "How many days are in a leap year, and why?",
    "Give two tips for saving money on groceries.",
    "Explain what a verb is, with an example.",
    "What are the primary colors?",
    "How can I be a better listener?",
    "Write a short birthday message for a friend.",
    "What is the largest planet in our solar system?",
    "Explain how a bicycle moves forward.",
    "Give three ideas for a healthy breakfast.",
    "What is the difference between a lake and a river?",
    "Describe a cat to someone who has never seen one.",
    "How do I politely decline an invitation?",
    "Translate 'good morning' into Spanish and French.",
    "Why do we have day and night?",
    "List three ways to reduce stress.",
    "Write a catchy slogan for a lemonade stand.",
    "What does it mean to be kind?",
    "Explain what a map is used for.",
    "Give me a simple riddle and its answer.",
    "How should I care for a small houseplant?",
    "What happens to water when it freezes?",
    "Suggest three books a ten-year-old might enjoy.",
    "How do I make a cup of tea?",
    "Explain the rule of three in writing.",
    "What are some polite ways to ask for help?",
    "Describe the sound of rain on a roof.",
    "Why is it important to wash your hands?",
    "Give two reasons to learn a second language.",
    "What is a habit, and how can I build a good one?",
    "Write a short invitation to a picnic.",
    "Explain what gravity does in one or two sentences.",
]


def builtin_prompts() -> pa.Table:
    """BUILTIN_PROMPTS as a PROMPTS_SCHEMA table, ids "builtin:<index>"."""
    return prompts_table([f"builtin:{i}" for i in range(len(BUILTIN_PROMPTS))],
                         [[{"role": "user", "content": text}] for text in BUILTIN_PROMPTS])


def _unique_prompts(prompt_ids: list[str], prompts: list[Messages]) -> pa.Table:
    """A prompts table keeping the first occurrence of each distinct message list."""
    seen, kept_ids, kept = set(), [], []
    for prompt_id, prompt in zip(prompt_ids, prompts):
        key = json.dumps(prompt)
        if key not in seen:
            seen.add(key)
            kept_ids.append(prompt_id)
            kept.append(prompt)
    return prompts_table(kept_ids, kept)


def _is_prompt_file(path: Path) -> bool:
    if not path.is_file():
        return False
    records = read_records(path)
    return bool(records) and "prompt" in records[0] and "chosen" not in records[0]


def load_prompts(path_or_name: str | Path) -> pa.Table:
    """Prompts for RL (duplicates dropped): "builtin", a .jsonl/.parquet with a `prompt` column (a string or
    messages), or any pair source accepted by `load_preference_data` (its prompts are taken)."""
    if str(path_or_name) == "builtin":
        return builtin_prompts()
    path = Path(path_or_name)
    if _is_prompt_file(path):
        records = read_records(path)
        prompts = [prompt_field(row, i, str(path)) for i, row in enumerate(records)]
        return _unique_prompts([f"{path.stem}:{i}" for i in range(len(records))], prompts)
    pairs, _ = load_preference_data(path_or_name)
    return _unique_prompts(pairs.column("pair_id").to_pylist(), pairs.column("prompt").to_pylist())


def split_prompts(table: pa.Table, heldout_fraction: float, seed: int) -> tuple[pa.Table, pa.Table]:
    """Deterministic (train, heldout) split of any table's rows; both keep the original row order."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    order = list(range(table.num_rows))
    random.Random(seed).shuffle(order)
    n_heldout = round(table.num_rows * heldout_fraction)
    heldout, train = sorted(order[:n_heldout]), sorted(order[n_heldout:])
    return table.take(pa.array(train, pa.int64())), table.take(pa.array(heldout, pa.int64()))
