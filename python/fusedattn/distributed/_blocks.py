"""The blocks of a ring step: which (query run, key run) pairs to compute, with which options.

A ring step pairs this rank's queries with one source rank's keys. Each shard is one run
of consecutive global positions (contiguous placement) or two (zigzag). For every pair of
runs the causal and window rules say whether no pair of positions is visible (the block
is skipped, never computed), every pair is (computed without masks) or some are (computed
with the rules at their global positions). Blocks are plain attention calls, so every
feature is the backend's own; only their partial results are merged here (by lse).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..dispatch import select_backend
from ..ops import forward_body
from ..semantics import AttentionCall
from ..validation import validate_attention
from ._placement import Segment

# attention(query_start=, key_start=) places a block at global positions; older builds
# lack it, and then only blocks whose positions do not matter (full blocks, or diagonal
# causal ones) can be computed.
HAS_OFFSETS = "query_start" in inspect.signature(validate_attention).parameters


@dataclass(frozen=True)
class RingOptions:
    """The normalized options of one ring_attention call, the same on every rank."""

    scale: float
    causal: bool
    window_left: int | None
    window_right: int | None  # as given; causal caps it at 0 when classifying
    softcap: float | None
    dropout_p: float
    dropout_seed: int | None
    alibi_slopes: torch.Tensor | None
    key_lengths: torch.Tensor | None  # (B,) over the global keys
    backend: str

    @property
    def positions_matter_everywhere(self) -> bool:
        """ALiBi and dropout depend on positions in every block, full ones included."""
        return self.alibi_slopes is not None or self.dropout_p > 0.0

    def visible_right(self) -> int | None:
        if self.causal:
            return 0 if self.window_right is None else min(self.window_right, 0)
        return self.window_right


@dataclass(frozen=True)
class Block:
    """One attention call of a ring step: query run q_run against key run k_run."""

    q_run: Segment
    k_run: Segment
    masked: bool  # some pairs invisible: the causal/window rules go into the call


def classify(options: RingOptions, q_run: Segment, k_run: Segment) -> str:
    """ "skip" (no visible pair), "full" (every pair visible) or "partial"."""
    left, right = options.window_left, options.visible_right()
    first_q, last_q, first_k, last_k = q_run.start, q_run.end - 1, k_run.start, k_run.end - 1
    if (right is not None and first_k > last_q + right) or (left is not None and last_k < first_q - left):
        return "skip"
    if (right is None or last_k <= first_q + right) and (left is None or first_k >= last_q - left):
        return "full"
    return "partial"


def needs_offsets(options: RingOptions, block: Block) -> bool:
    """Whether the block's call must place its rows and keys at their global positions."""
    if options.positions_matter_everywhere:
        return True
    if not block.masked:
        return False
    # A diagonal causal block (same run of positions) is the same at any offset.
    diagonal = block.q_run.start == block.k_run.start and block.q_run.length == block.k_run.length
    return not (diagonal and options.window_left is None and options.window_right is None)


def plan_blocks(options: RingOptions, q_runs: tuple[Segment, ...], k_runs: tuple[Segment, ...]) -> list[Block]:
    """The blocks to compute between this rank's query runs and a source's key runs."""
    blocks = []
    for q_run in q_runs:
        for k_run in k_runs:
            kind = classify(options, q_run, k_run)
            if kind != "skip":
                blocks.append(Block(q_run, k_run, masked=kind == "partial"))
    return blocks


def block_call(
    options: RingOptions, block: Block, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, needs_grad: bool
) -> AttentionCall:
    """The validated call of a block; q, k, v are the whole shards (sliced here)."""
    q_part = q.narrow(2, block.q_run.local_start, block.q_run.length)
    k_part = k.narrow(2, block.k_run.local_start, block.k_run.length)
    v_part = v.narrow(2, block.k_run.local_start, block.k_run.length)
    arguments: dict[str, Any] = {
        "scale": options.scale,
        "softcap": options.softcap,
        "alibi_slopes": options.alibi_slopes,
        "dropout_p": options.dropout_p,
        "dropout_seed": options.dropout_seed,
    }
    if options.key_lengths is not None:
        # key_lengths count global keys; a block sees those of its own run.
        arguments["key_lengths"] = (options.key_lengths - block.k_run.start).clamp(0, block.k_run.length)
    if block.masked:
        arguments["causal"] = options.causal
        arguments["window"] = (options.window_left, options.window_right)
        # The queries and keys are the same global sequence, so both alignments coincide.
        arguments["causal_alignment"] = "top_left"
    if needs_offsets(options, block):
        arguments["causal_alignment"] = "top_left"
        arguments["query_start"] = block.q_run.start
        arguments["key_start"] = block.k_run.start
    call = validate_attention(q_part, k_part, v_part, **arguments)
    return replace(call, needs_grad=needs_grad)


def block_forward(call: AttentionCall, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of one block, from the backend the dispatcher picks for it."""
    return forward_body(select_backend(call, backend), call)


def block_backward(
    call: AttentionCall,
    backend: str,
    grad_out: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of one block, given the merged (whole-sequence) out and lse of its rows.

    That is FlashAttention's ring backward: P = exp(S - lse), dS = P * (dP - rowsum(dO * out)),
    which every backend's backward computes from the out and lse it is handed.
    """
    grads = select_backend(call, backend).backward(call, grad_out, out.to(call.dtype), lse)
    return grads[0], grads[1], grads[2]
