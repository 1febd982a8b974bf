"""The report's data cannot spell an address or close its <script> and reads back unchanged; the pipeline's report.json
becomes a method x metric table."""

import json

import pytest

from fr_jax.view.report import embed
from fr_jax.view.runs import read_run


def test_embedded_data_spells_no_address_and_reads_back():
    value = {"reply": 'see https://example.org/x </script><script>alert(1)</script> \\/ "q"', "n": [1, 2.5, None]}
    text = embed(value)
    assert "://" not in text and "</" not in text and "<script" not in text
    assert json.loads(text) == value


def test_the_pipeline_report_becomes_a_method_by_metric_table(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward/total": 0.5}\n')
    rows = [
        {"method": "cot", "pass_at_1": 0.61, "worker_calls": 1.0, "worker_tokens": 900.0, "format_ok": 1.0},
        {"method": "flowreasoner", "pass_at_1": 0.72, "worker_calls": 3.5, "worker_tokens": 4100.0, "format_ok": 0.97},
    ]
    (tmp_path / "report.json").write_text(json.dumps({"split": "test", "rows": rows}))
    [table] = read_run(tmp_path).evals
    assert (table.split, [r["method"] for r in table.rows]) == ("test", ["cot", "flowreasoner"])
    assert table.columns == ["pass_at_1", "worker_calls", "worker_tokens", "format_ok"]
    assert table.rows[1]["values"]["pass_at_1"] == 0.72
    (tmp_path / "report.json").write_text(json.dumps([{"pass_at_1": 0.5}]))
    with pytest.raises(ValueError, match=r"report.json: expected rows of \{method, metric: value, ...\}"):
        read_run(tmp_path)
