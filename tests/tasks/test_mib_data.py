"""MIB's datasets from local files (`tests/data/mib_*.jsonl`, rows written here in the schema of the
mib-bench datasets): the pairs MIB's loader makes, its filter, other counterfactual columns, Parquet."""

import json
from pathlib import Path

import pytest
from circuits_tasks import load_pairs

from circuits.errors import CircuitsWarning, InputError

DATA = Path(__file__).resolve().parents[1] / "data"


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines()]


def test_ioi_rows_as_mib_makes_them(llama):
    with pytest.warns(CircuitsWarning, match="1 of 3 rows dropped by MIB's filter"):
        pairs = load_pairs(llama, DATA / "mib_ioi.jsonl").pairs  # Bartholomew is not one token
    rows = _rows("mib_ioi.jsonl")[:2]
    assert pairs.clean.shape[0] == 2
    for i, row in enumerate(rows):
        assert pairs.clean[i, : int(pairs.lengths[i])].tolist() == llama.to_ids([row["prompt"]])[0]
        want = llama.to_ids([row["s2_io_flip_counterfactual"]["prompt"]])[0]
        assert pairs.corrupted[i, : int(pairs.lengths[i])].tolist() == want
        assert int(pairs.answer[i]) == llama.single_token_id(" " + row["metadata"]["indirect_object"])
        assert int(pairs.distractor[i]) == llama.single_token_id(" " + row["metadata"]["subject"])
    with pytest.warns(CircuitsWarning):
        other = load_pairs(llama, DATA / "mib_ioi.jsonl", counterfactual="abc_counterfactual").pairs
    assert (
        other.corrupted[0, : int(other.lengths[0])].tolist()
        == llama.to_ids([rows[0]["abc_counterfactual"]["prompt"]])[0]
    )


def test_mcqa_and_arithmetic_rows(llama):
    with pytest.warns(CircuitsWarning, match="1 of 3 rows dropped"):
        mcqa = load_pairs(llama, DATA / "mib_mcqa.jsonl").pairs
    assert mcqa.answer.tolist() == [llama.single_token_id("B"), llama.single_token_id("A")]
    assert mcqa.distractor.tolist() == [llama.single_token_id("A"), llama.single_token_id("B")]
    with pytest.warns(CircuitsWarning, match="3 of 5 rows dropped"):  # a '-' row, label 12, no counterfactual
        arithmetic = load_pairs(llama, DATA / "mib_arithmetic.jsonl").pairs
    assert arithmetic.answer.tolist() == [llama.single_token_id("7"), llama.single_token_id("2")]
    assert arithmetic.distractor.tolist() == [llama.single_token_id("5"), llama.single_token_id("8")]
    with pytest.warns(CircuitsWarning, match="4 of 5 rows dropped"):
        subtraction = load_pairs(llama, DATA / "mib_arithmetic.jsonl", mib_task="arithmetic-subtraction")
    assert subtraction.pairs.answer.tolist() == [llama.single_token_id("5")]


def test_parquet_files_read_as_their_json_export(llama, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    path = tmp_path / "ioi.parquet"
    pq.write_table(pa.Table.from_pylist(_rows("mib_ioi.jsonl")), path)
    with pytest.warns(CircuitsWarning):
        from_parquet = load_pairs(llama, path).pairs
    with pytest.warns(CircuitsWarning):
        from_json = load_pairs(llama, DATA / "mib_ioi.jsonl").pairs
    assert from_parquet.clean.tolist() == from_json.clean.tolist()
    assert from_parquet.answer.tolist() == from_json.answer.tolist()


def test_unknown_mib_task_is_refused(llama):
    with pytest.raises(InputError, match="unknown MIB task"):
        load_pairs(llama, DATA / "mib_ioi.jsonl", format="mib", mib_task="ewok")
