"""The report's data cannot spell an address or close its <script>, and reads back unchanged."""

import json

from fr_jax.view.report import embed


def test_embedded_data_spells_no_address_and_reads_back():
    value = {"reply": 'see https://example.org/x </script><script>alert(1)</script> \\/ "q"', "n": [1, 2.5, None]}
    text = embed(value)
    assert "://" not in text and "</" not in text and "<script" not in text
    assert json.loads(text) == value
