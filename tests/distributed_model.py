"""A tiny transformers Llama with its sequence sharded over the ranks (tests/test_distributed.py).

Each rank runs the model on its zigzag shard of the tokens, with their global position
ids, through fusedattn.distributed.register_transformers; its loss is the sum of its
tokens' losses over the number of tokens of the whole batch, so the ranks' losses add up
to the unsharded mean loss, and their gradients (summed, as DDP would) to its gradients.
The oracle is the same model, unsharded, with torch SDPA attention; float64.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

VOCAB, LENGTH, BATCH = 61, 24, 2


def _model(implementation: str):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation=implementation, dtype=torch.float64
    )


def _loss(model, ids: torch.Tensor, positions: torch.Tensor, labels: torch.Tensor, tokens: int) -> torch.Tensor:
    logits = model(input_ids=ids, position_ids=positions).logits
    return (
        torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        / tokens
    )


def llama_case(rank: int, world: int) -> str:
    import fusedattn.distributed as fd

    placement = "zigzag"
    sharded = _model(fd.register_transformers(placement=placement))
    oracle = _model("sdpa")  # eager runs its softmax in float32
    oracle.load_state_dict(sharded.state_dict())
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=generator)
    labels = torch.cat([ids[:, 1:], torch.full((BATCH, 1), -100)], dim=1)  # next token, globally
    positions = torch.arange(LENGTH)[None].expand(BATCH, -1)
    tokens = int((labels != -100).sum())

    full_loss = _loss(oracle, ids, positions, labels, tokens)
    full_loss.backward()

    def shard(x: torch.Tensor) -> torch.Tensor:
        return fd.shard_sequence(x, dim=1, placement=placement)

    loss = _loss(sharded, shard(ids), shard(positions), shard(labels), tokens)
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    problems = []
    if not torch.allclose(total, full_loss.detach(), rtol=1e-10, atol=0):
        problems.append(f"loss {float(total)} != {float(full_loss)}")
    worst = 0.0
    for (name, parameter), reference in zip(sharded.named_parameters(), oracle.parameters(), strict=True):
        grad = parameter.grad.clone()
        dist.all_reduce(grad)
        if torch.isnan(grad).any():
            problems.append(f"{name}: NaN gradient")
        error = float((grad - reference.grad).abs().max()) / (1.0 + float(reference.grad.abs().max()))
        worst = max(worst, error)
        if error > 1e-9:
            problems.append(f"{name}: gradient off by {error:.2e}")
    return "; ".join(problems)
