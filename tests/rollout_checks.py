"""Shared by the engine tests: an independent reference for log-probabilities and an EOS-forcing hook."""

from __future__ import annotations

import torch

from spiral_lit.training.batching import pack


def training_logprobs(model, prompts, completions, temperature: float) -> list[torch.Tensor]:
    """log_softmax(logits / T) at each completion token, from one right-padded forward pass (as the trainer does).

    Written out here rather than calling ``token_logprobs``, so the reference does not share code with what it checks.
    """
    batch = pack(prompts, completions, pad_id=0)
    with torch.no_grad():
        logits_BTV = model(input_ids=batch.input_ids_BT, attention_mask=batch.attention_mask_BT).logits[:, :-1]
    logp_BT = torch.log_softmax(logits_BTV.float() / temperature, dim=-1)
    logp_BT = logp_BT.gather(-1, batch.targets_BT1.unsqueeze(-1)).squeeze(-1)
    return [logp_BT[i][batch.completion_mask_BT1[i]] for i in range(len(prompts))]


class EOSOnStep:
    """lm_head forward hook: EOS is forbidden everywhere except row ``row`` at forward call ``step`` (forced)."""

    def __init__(self, eos_id: int, row: int, step: int) -> None:
        self.eos_id, self.row, self.step, self.calls = eos_id, row, step, 0

    def __call__(self, module, inputs, logits_BTV: torch.Tensor) -> torch.Tensor:
        self.calls += 1  # call 1 is the prefill, which picks the first new token
        logits_BTV = logits_BTV.clone()
        logits_BTV[:, -1, self.eos_id] = -1e4
        if self.calls == self.step:
            logits_BTV[self.row, -1, self.eos_id] = 1e4
        return logits_BTV


class EOSBias:
    """lm_head forward hook: adds ``bias`` to the EOS logit of every row, so sampled traces end at varied steps."""

    def __init__(self, eos_id: int, bias: float) -> None:
        self.eos_id, self.bias = eos_id, bias

    def __call__(self, module, inputs, logits_BTV: torch.Tensor) -> torch.Tensor:
        logits_BTV = logits_BTV.clone()
        logits_BTV[..., self.eos_id] += self.bias
        return logits_BTV
