import numpy as np
import pyarrow as pa
import torch

from pipeline.arrow import (numpy_to_ragged, padded_to_ragged, parquet_bytes, ragged_to_numpy, ragged_to_padded,
                            read_parquet_bytes, request_table)


def test_ragged_round_trip_including_empty_rows_and_sliced_columns():
    rows = [np.array([1, 2, 3]), np.array([], dtype=np.int64), np.array([4])]
    column = numpy_to_ragged(rows, pa.int32())
    assert column.type == pa.list_(pa.int32())
    assert [r.tolist() for r in ragged_to_numpy(column)] == [[1, 2, 3], [], [4]]
    assert [r.tolist() for r in ragged_to_numpy(column.slice(1))] == [[], [4]]
    chunked = pa.chunked_array([column, column])
    assert len(ragged_to_numpy(chunked)) == 6


def test_padded_round_trip():
    rows = [np.array([1.0, 2.0]), np.array([3.0])]
    padded, mask = ragged_to_padded(rows)
    assert torch.equal(padded, torch.tensor([[1.0, 2.0], [3.0, 0.0]])) and torch.equal(mask, torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    assert [r.tolist() for r in padded_to_ragged(padded, mask)] == [[1.0, 2.0], [3.0]]


def test_request_table_schema_and_extra_columns():
    table = request_table([[1, 2]], [[3]], [False], tag=pa.array(["x"]))
    assert table.schema.field("prompt_ids").type == pa.list_(pa.int32())
    assert table.column_names == ["prompt_ids", "response_ids", "finished", "tag"]


def test_parquet_bytes_round_trip_keeps_ragged_columns():
    table = pa.table({"prompt_id": ["a", "b"], "response_ids": numpy_to_ragged([np.array([1, 2]), np.array([3])], pa.int32()),
                      "reward": pa.array([0.5, -1.0], pa.float32())})
    assert read_parquet_bytes(parquet_bytes(table)).equals(table)


def test_contexts_round_trip_including_empty_rows_and_slices():
    from pipeline.arrow import CONTEXT_COLUMN, arrow_to_contexts, context_columns, contexts_to_arrow

    rows = [[[1, 2], [3]], [[4], [5, 6, 7]], [[8], []]]
    column = contexts_to_arrow(rows)
    assert column.type == pa.list_(pa.list_(pa.int32()))
    assert [[c.tolist() for c in row] for row in arrow_to_contexts(column)] == rows
    assert [[c.tolist() for c in row] for row in arrow_to_contexts(pa.chunked_array([column.slice(1, 2)]))] == rows[1:]
    table = request_table([[1]] * 3, [[2]] * 3, [True] * 3, **context_columns(rows))
    assert table.schema.field(CONTEXT_COLUMN).type == column.type
    assert context_columns([[], []]) == {}  # forms raw and centered: no column
