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


def test_readme_lists_every_environment_variable():
    # fusedattn.environment.SETTINGS is the one table; the README's copy must match it, and
    # no module may read a FUSEDATTN_* variable the table does not declare.
    import re

    from fusedattn.environment import SETTINGS

    text = README.read_text()
    section = text.split("### Environment variables")[1].split("\n## ")[0]
    listed = re.findall(r"^\| `([A-Z_]+)` \|", section, flags=re.MULTILINE)
    assert listed == list(SETTINGS)
    package = README.parent
    sources = [
        *package.glob("python/fusedattn/**/*.py"),
        *package.glob("kernels/*.py"),
        *package.glob("csrc/**/*.cpp"),
        *package.glob("csrc/**/*.inc"),
        *package.glob("csrc/**/*.h"),
    ]
    read = set()
    for path in sources:
        read |= set(
            re.findall(
                r"(?:getenv|environ\.get|environ\[|get)\(\s*\"((?:FUSEDATTN|TRITON)_[A-Z_]+)\"", path.read_text()
            )
        )
    # the scan sees Python reads and C++ reads in sources and kernel fragments
    assert {"FUSEDATTN_CPU_ISA", "FUSEDATTN_TRITON_DECODE", "FUSEDATTN_CPU_BYTE_TABLES"} <= read
    assert read <= set(SETTINGS), read - set(SETTINGS)


def test_environment_values_outside_their_choices_are_refused(monkeypatch):
    import pytest
    from fusedattn import environment

    monkeypatch.setenv("FUSEDATTN_TRITON_DECODE", "sometimes")
    with pytest.raises(
        ValueError, match="FUSEDATTN_TRITON_DECODE: expected one of auto, always, never, got 'sometimes'"
    ):
        environment.get("FUSEDATTN_TRITON_DECODE")
    monkeypatch.setenv("FUSEDATTN_TRITON_DECODE", "")
    assert environment.get("FUSEDATTN_TRITON_DECODE") == "auto"


def test_architecture_feature_table_lists_every_feature():
    import re

    from fusedattn.semantics import FEATURES

    text = (README.parent / "docs" / "architecture.md").read_text()
    section = text.split("## Features and where they live")[1].split("\n## ")[0]
    listed = re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE)
    assert listed == list(FEATURES)
