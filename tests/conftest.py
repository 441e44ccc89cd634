import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_everything():
    # Every test draws fresh random inputs from a fixed seed: reproducible, never zeros.
    torch.manual_seed(0)
    yield


@pytest.fixture
def cpu_variant(monkeypatch):
    """select(isa): run the CPU kernels' `isa` variant (FUSEDATTN_CPU_ISA) for this test, or
    skip when this build did not compile it or this CPU lacks its instructions."""
    import fusedattn
    from fusedattn.backends.cpu import selected_isa

    def select(isa: str) -> None:
        variants = [s.split()[0] for s in fusedattn._native.build_info().get("simd", []) if "runtime" in s]
        if isa not in variants:
            pytest.skip(f"{isa} variant not compiled")
        monkeypatch.setenv("FUSEDATTN_CPU_ISA", isa)
        try:
            assert selected_isa() == isa
        except RuntimeError as error:  # this CPU lacks the instructions
            pytest.skip(str(error))

    return select
