"""Generation with memory: read the prompt segment by segment, then decode with a KV cache."""

from __future__ import annotations

import torch
from transformers import DynamicCache


def pick_next_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None) -> torch.Tensor:
    """Greedy argmax, or a sample from softmax(logits / temperature) restricted to the top k."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / max(temperature, 1e-5)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1).squeeze(-1)


def generate_with_memory(model, input_ids: torch.LongTensor, max_new_tokens: int, do_sample: bool, temperature: float,
                         top_k: int | None, eos_token_id: int | list[int] | None,
                         pad_token_id: int | None) -> torch.LongTensor:
    """Prompt [B, P] -> [B, P + new]. Every full prompt segment but the last is read with write tokens
    (memory updated, as in training); the last 1..L prompt tokens open a segment that generation extends
    with the memory read so far. Rows that emit EOS are padded afterwards."""
    cfg = model.config
    batch, prompt_len = input_ids.shape
    if prompt_len == 0 or max_new_tokens < 1:
        raise ValueError("generate needs a non-empty prompt and max_new_tokens >= 1")
    full = cfg.memory_kind == "full"
    segment_len = prompt_len if full else cfg.segment_len
    n_read = 0 if full else (prompt_len - 1) // segment_len
    first_position = cfg.num_memory_tokens if cfg.memory_kind == "rmt" else 0
    open_len = prompt_len - n_read * segment_len
    last_position = first_position + open_len + max_new_tokens - 2
    if last_position >= cfg.max_positions:
        raise ValueError(f"the last segment would need position {last_position} but the decoder has "
                         f"{cfg.max_positions}: lower max_new_tokens")
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []),
                       device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)

    cell, embed, head = model.cell(), model.get_input_embeddings(), model.get_output_embeddings()
    state = cell.begin(batch, input_ids.device)
    embeds = embed(input_ids)
    for k in range(n_read):
        _, state, _ = cell.step(state, embeds[:, k * segment_len:(k + 1) * segment_len], write=True)
    cache = DynamicCache(config=cfg.decoder_config)
    hidden, _, cache = cell.step(state, embeds[:, n_read * segment_len:], write=False, cache=cache)

    tokens = [input_ids]
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        next_token = pick_next_token(head(hidden[:, -1]).float(), do_sample, temperature, top_k)
        next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
        finished |= torch.isin(next_token, eos)
        tokens.append(next_token[:, None])
        if finished.all() or i == max_new_tokens - 1:
            break
        hidden, _, cache = cell.step(state, embed(next_token[:, None]), write=False, cache=cache, offset=open_len + i)
    return torch.cat(tokens, dim=1)
