"""Task generators (determinism, equal lengths, single-token answers, metrics) and file loaders."""

import csv
import io
import json

import pytest
import torch
from circuits_tasks import TASKS, GreaterThanMetric, baseline, ioi_pairs, load_pairs

from circuits.data import PromptPairs
from circuits.errors import FileFormatError


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_are_deterministic_equal_length_and_single_token(smollm2, name):
    make = TASKS[name]
    a, b, other = make(smollm2, 12, seed=3), make(smollm2, 12, seed=3), make(smollm2, 12, seed=4)
    assert torch.equal(a.pairs.clean, b.pairs.clean) and torch.equal(a.pairs.answer, b.pairs.answer)
    assert not torch.equal(a.pairs.clean, other.pairs.clean)
    assert len(a.pairs) == 12 and a.requested == 12
    for (clean, corrupted), answer, distractor in zip(a.pairs.texts, a.pairs.answer, a.pairs.distractor):
        if name != "induction":  # induction is built from ids; its texts are for reading only
            lengths = [len(ids) for ids in smollm2.to_ids([clean, corrupted])]
            assert lengths[0] == lengths[1]
        for token in (int(answer), int(distractor)):
            text = smollm2.tokenizer.decode([token])
            assert smollm2.tokenizer(text, add_special_tokens=False)["input_ids"] == [token]
    assert int(a.pairs.lengths.max()) <= a.pairs.n_positions


def test_ioi_solved_by_smollm2(smollm2):
    result = baseline(smollm2, ioi_pairs(smollm2, 24))
    assert result.accuracy == 1.0 and 3.5 < result.clean_metric < 7


def test_greater_than_metric_by_hand():
    ids = [10, 11, 12, 13]  # numbers 0..3
    metric = GreaterThanMetric(ids)
    logits = torch.full((1, 2, 20), -1e9)
    logits[0, 1, ids] = torch.log(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    pairs = PromptPairs(
        torch.zeros(1, 2, dtype=torch.long),
        torch.zeros(1, 2, dtype=torch.long),
        torch.tensor([2]),
        torch.tensor([12]),
        torch.tensor([10]),
    )  # greater: values >= 2, smaller: values <= 0
    assert float(metric(logits, pairs)[0]) == pytest.approx(0.3 + 0.4 - 0.1)


def write(path, text):
    path.write_text(text)
    return path


def csv_text(header, *rows):
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Alice gave a drink to"
OURS = ("clean", "corrupted", "answer", "distractor")
EAP = ("clean", "corrupted", "correct_idx", "incorrect_idx")
HELLO = ("Then Tom said hello to", "Then Anna said hello to")


def test_loaders_read_each_format(llama, tmp_path):
    mary, john = llama.single_token_id(" Mary"), llama.single_token_id(" John")
    mib_row = {
        "prompt": CLEAN,
        "metadata": {"indirect_object": "Mary", "subject": "John"},
        "s2_io_flip_counterfactual": {"prompt": CORRUPTED},
    }
    files = [
        write(tmp_path / "ours.csv", csv_text(OURS, (CLEAN, CORRUPTED, " Mary", " John"))),
        write(
            tmp_path / "ours.jsonl", json.dumps(dict(zip(OURS, (CLEAN, CORRUPTED, " Mary", " John")))) + "\n"
        ),
        write(tmp_path / "eap.csv", csv_text(EAP, (CLEAN, CORRUPTED, mary, john))),
        write(
            tmp_path / "label.csv",
            csv_text(("clean", "corrupted", "label"), (CLEAN, CORRUPTED, f"[{mary}, {john}]")),
        ),
        write(tmp_path / "mib.jsonl", json.dumps(mib_row) + "\n"),
    ]
    for path in files:
        pairs = load_pairs(llama, path).pairs
        assert pairs.answer.tolist() == [mary] and pairs.distractor.tolist() == [john]
        assert pairs.clean.tolist() == [llama.to_ids([CLEAN])[0]]


MIB_NO_IO = {
    "prompt": HELLO[0],
    "metadata": {"subject": "Tom"},
    "s2_io_flip_counterfactual": {"prompt": HELLO[1]},
}


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("missing.csv", csv_text(OURS, (*HELLO, "", "")), "row 1: missing answer, distractor"),
        (
            "prefix.csv",
            csv_text(OURS, (*HELLO, " Tom", " Anna"), (*HELLO, " Tom", " Tomato")),
            "row 2: the answer .* is the start of the distractor",
        ),
        (
            "label.csv",
            csv_text(("clean", "corrupted", "label"), (*HELLO, "oops")),
            "row 1, column label: 'oops'",
        ),
        ("ids.csv", csv_text(EAP, (*HELLO, 99999999, 1)), "outside the vocabulary"),
        ("columns.csv", csv_text(("text", "target"), ("hello", "world")), "cannot tell the format"),
        ("empty.csv", csv_text(OURS), "no rows"),
        ("rows.jsonl", '{"clean": "a"}\nnot json\n', "row 2: not valid JSON"),
        ("mib.jsonl", json.dumps(MIB_NO_IO) + "\n", "row 1: column indirect_object must be text"),
        ("pairs.txt", "whatever", "unknown file type"),
    ],
)
def test_loader_errors_name_the_row(llama, tmp_path, name, text, message):
    with pytest.raises(FileFormatError, match=message):
        load_pairs(llama, write(tmp_path / name, text))


def test_user_files_name_every_bad_row_and_can_drop_them(llama, tmp_path, recwarn):
    """Every unusable row is named with its reason; `drop_invalid` (the CLI's --skip-invalid) drops them,
    lists them and counts them; header names may carry spaces after the commas."""
    good = (CLEAN, CORRUPTED, " Mary", " John")
    rows = [
        good,
        ("Then Tom said hello to", "Then Anna said hello to you", " Tom", " Tomato"),
        good,
        ("x", "", " Tom", " Anna"),
    ]
    path = write(
        tmp_path / "mine.csv", csv_text(OURS, *rows).replace(",", ", ", 3)
    )  # "clean, corrupted, ..."
    with pytest.raises(FileFormatError, match=r"2 invalid row\(s\)") as refused:
        load_pairs(llama, path)
    assert "row 2: the answer (tokens [321])" in str(refused.value) and "row 4: missing corrupted" in str(
        refused.value
    )
    task = load_pairs(llama, path, drop_invalid=True)
    assert len(task.pairs) == 2 and task.dropped == 2 and task.requested == 4
    (warning,) = [w for w in recwarn if "rows dropped" in str(w.message)]
    assert "2 of 4 rows dropped" in str(warning.message) and "row 2" in str(warning.message)
    with pytest.raises(FileFormatError, match="every row is invalid"):
        load_pairs(llama, write(tmp_path / "bad.csv", csv_text(OURS, rows[1], rows[3])), drop_invalid=True)
