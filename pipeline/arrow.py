"""Arrow schemas of the data that moves between actors, and the one place where Arrow <-> numpy/torch happens.

Token ids are list<int32>, per-token floats are list<float32>. Ragged lists are read as zero-copy numpy
slices of the column's flat values buffer and written back from one flat buffer plus offsets.
"""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

TOKENS = pa.list_(pa.int32())
FLOATS = pa.list_(pa.float32())

# What the frozen base model scores: one row per (prompt, response).
SCORE_REQUEST_SCHEMA = pa.schema([
    ("prompt_ids", TOKENS),      # chat-templated prompt
    ("response_ids", TOKENS),    # response tokens (ends with EOS when finished)
    ("finished", pa.bool_()),    # False: cut by a length limit, no EOS
])

# Optional request column for the reward forms pmi and contrastive: each row's extra prompts, after which the
# response is scored again (pipeline.chat.context_prompts), as list<list<int32>>.
CONTEXT_COLUMN = "context_prompt_ids"
CONTEXTS = pa.list_(TOKENS)

# What it returns: the request columns plus these.
SCORED_FIELDS = [
    ("token_rewards", FLOATS),   # r_h = Q(s_h, a_h) - V(s_{h+1}), one per response token
    ("ref_logprobs", FLOATS),    # log pi_ref(a_h | s_h) at temperature 1, for the KL penalty
    ("reward", pa.float32()),    # response reward: sum of r_h (or their mean when normalised)
]


def ragged_to_numpy(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """A list<...> column as one numpy array per row (zero-copy views into the flat values)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    values = column.values.to_numpy(zero_copy_only=False)
    offsets = column.offsets.to_numpy() - column.offsets[0].as_py()
    values = values[column.offsets[0].as_py():]
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(column))]


def numpy_to_ragged(rows: list[np.ndarray] | list[list], value_type: pa.DataType) -> pa.ListArray:
    """One numpy array (or list) per row -> a list<value_type> Arrow column, built from one flat buffer."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate([np.asarray(r) for r in rows]) if rows else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(value_type.to_pandas_dtype())))


def contexts_to_arrow(rows: list[list]) -> pa.ListArray:
    """Per row a list of token-id lists -> a list<list<int32>> column (CONTEXT_COLUMN)."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), numpy_to_ragged([c for r in rows for c in r], pa.int32()))


def arrow_to_contexts(column: pa.ChunkedArray | pa.Array) -> list[list[np.ndarray]]:
    """A list<list<int32>> column -> per row a list of numpy token-id arrays (views into the flat values)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    inner = ragged_to_numpy(column.values)  # every inner list of the buffer; a slice's offsets index into it
    offsets = column.offsets.to_numpy()
    return [inner[offsets[i]:offsets[i + 1]] for i in range(len(column))]


def context_columns(contexts: list[list]) -> dict:
    """{CONTEXT_COLUMN: column} for request_table when any row has extra contexts, else {} (forms raw, centered)."""
    return {CONTEXT_COLUMN: contexts_to_arrow(contexts)} if any(contexts) else {}


def ragged_to_padded(rows: list[np.ndarray], pad_value: float = 0.0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths -> (padded [B, T] tensor, mask [B, T]); padding on the right."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), pad_value, dtype=dtype)
    mask = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(np.asarray(r), dtype=dtype)  # copies: Arrow buffers are read-only
        mask[i, : len(r)] = 1.0
    return out, mask


def padded_to_ragged(padded: torch.Tensor, mask: torch.Tensor) -> list[np.ndarray]:
    """Inverse of ragged_to_padded: keep each row's valid prefix."""
    lengths = mask.sum(dim=1).long().tolist()
    values = padded.detach().cpu().float().numpy()
    return [values[i, :n] for i, n in enumerate(lengths)]


def request_table(prompt_ids: list, response_ids: list, finished: list[bool], **extra_columns) -> pa.Table:
    """A SCORE_REQUEST table, with any extra columns (ids, subsets) carried along untouched."""
    columns = {"prompt_ids": numpy_to_ragged(prompt_ids, pa.int32()),
               "response_ids": numpy_to_ragged(response_ids, pa.int32()),
               "finished": pa.array(finished, pa.bool_())}
    return pa.table({**columns, **extra_columns})


# What a rollout engine returns: one row per sampled response (the n samples of a prompt are adjacent).
ROLLOUT_SCHEMA = pa.schema([
    ("prompt_id", pa.string()),
    ("prompt_ids", TOKENS),
    ("response_ids", TOKENS),
    ("sample_logprobs", FLOATS),  # log-probs of the sampled tokens under the sampling distribution (old policy)
    ("finish_reason", pa.string()),  # "stop" (EOS) or "length"
    ("finished", pa.bool_()),
])

# What the learners train on: the scored rollout plus per-token advantages (and returns for the critic).
EXPERIENCE_FIELDS = [
    ("advantages", FLOATS),
    ("returns", FLOATS),
]


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as the bytes of a Parquet file (for Storage.write_bytes); read back with read_parquet_bytes."""
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def read_parquet_bytes(data: bytes) -> pa.Table:
    return pq.read_table(io.BytesIO(data))
