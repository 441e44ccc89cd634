"""The op layer's one options table carries every field of the call, both ways."""

from __future__ import annotations

import dataclasses

import torch
from fusedattn.ops import OPTIONS, _call_from_arguments, op_arguments
from fusedattn.semantics import AttentionCall
from fusedattn.validation import validate_attention


def test_every_call_field_has_one_op_option():
    carried = [option.field for option in OPTIONS]
    fields = {field.name for field in dataclasses.fields(AttentionCall)} - {"q", "k", "v", "needs_grad"}
    assert sorted(carried) == sorted(fields)


def test_op_arguments_round_trip():
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    options = dict(causal=True, causal_alignment="top_left", window=(3, None), softcap=2.0, dropout_p=0.1,
                   dropout_seed=7, alibi_slopes=torch.rand(4), key_lengths=torch.tensor([5, 2]))  # fmt: skip
    call = validate_attention(q, k, v, **options)
    rebuilt = _call_from_arguments(op_arguments(call))
    for field in dataclasses.fields(AttentionCall):
        if field.name == "needs_grad":
            continue
        mine, theirs = getattr(call, field.name), getattr(rebuilt, field.name)
        if isinstance(mine, torch.Tensor):
            assert theirs is mine, field.name
        else:
            assert theirs == mine, field.name
