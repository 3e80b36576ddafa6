"""A test double for a rollout engine: every aggregation prompt is answered with a fixed audit and every other
prompt with a fixed solution, so that what evaluation and the scaffolds do with an answer is checked alone."""

from __future__ import annotations

import torch

from spiral_lit.rollout.base import Completion


class ScriptedEngine:
    """Answers every aggregation prompt with a fixed audit and every other prompt with a fixed solution: a test
    double for the engine, so that the resolution of ``Keep Candidate k:`` is checked alone."""

    def __init__(self, tokenizer, audit: str, solution: str = "oops") -> None:
        self.tokenizer, self.audit, self.solution, self.prompts_seen = tokenizer, audit, solution, []

    def generate(self, prompts, n, sampling, seed):
        out = []
        for ids in prompts:
            self.prompts_seen.append(self.tokenizer.decode(ids))
            text = self.audit if "candidate solutions" in self.prompts_seen[-1] else self.solution
            token_ids = self.tokenizer.encode(text, add_special_tokens=False)
            out.append([Completion(token_ids, torch.zeros(len(token_ids)), "stop", text) for _ in range(n)])
        return out
