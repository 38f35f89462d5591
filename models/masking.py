"""Masked-LM corruption: BERT's 80/10/10 recipe (Devlin et al., 2019, section 3.1 and appendix C.2)."""

from __future__ import annotations

from typing import Sequence

import torch


def mask_tokens(
    input_ids: torch.Tensor,
    vocab_size: int,
    mask_id: int,
    special_ids: Sequence[int],
    mask_prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids (B, T) -> (inputs, labels), both (B, T).

    Each non-special token is selected with probability `mask_prob`; a selected
    token becomes `mask_id` 80% of the time, a random non-special token 10%, and
    stays as it is 10%. labels hold the original id at selected positions and
    -100 elsewhere. Random numbers are drawn on the generator's device (so a CPU
    generator gives the same masks for CPU and GPU batches) and moved to
    input_ids' device.
    """
    if not 0.0 <= mask_prob <= 1.0:
        raise ValueError(f"mask_prob: must be in [0, 1], got {mask_prob}")
    device = input_ids.device
    draw = generator.device if generator is not None else device
    special = torch.tensor(sorted(set(special_ids) | {mask_id}), dtype=input_ids.dtype, device=device)
    allowed = torch.arange(vocab_size, device=device)
    allowed = allowed[~torch.isin(allowed, special)]  # (V - n_special,) ids a random replacement may take
    if allowed.numel() == 0:
        raise ValueError("special_ids: cover the whole vocabulary, nothing left to draw replacements from")

    # three draws of the full shape, always in this order, so the result depends on the generator alone
    select_u = torch.rand(input_ids.shape, generator=generator, device=draw).to(device)  # (B, T)
    action_u = torch.rand(input_ids.shape, generator=generator, device=draw).to(device)  # (B, T)
    pick = torch.randint(allowed.numel(), input_ids.shape, generator=generator, device=draw).to(device)  # (B, T)

    selected = (select_u < mask_prob) & ~torch.isin(input_ids, special)  # (B, T)
    to_mask = selected & (action_u < 0.8)
    to_random = selected & (action_u >= 0.8) & (action_u < 0.9)  # the remaining 10% keep their token
    inputs = torch.where(to_mask, torch.full_like(input_ids, mask_id), input_ids)
    inputs = torch.where(to_random, allowed[pick].to(input_ids.dtype), inputs)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    return inputs, labels
