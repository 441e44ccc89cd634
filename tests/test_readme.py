"""The README's feature table is generated from the backends' declared capabilities, so
it cannot claim what a backend does not declare (and every declared feature is covered
by the parity grid and the backend's tests)."""

from __future__ import annotations

from pathlib import Path

from fusedattn.info import capability_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_feature_table_matches_declared_capabilities():
    text = README.read_text()
    section = text.split("<!-- section:features:start -->")[1].split("<!-- section:features:end -->")[0]
    assert capability_table() in section, "regenerate with: python -m fusedattn info --table"
