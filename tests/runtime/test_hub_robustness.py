"""Checkpoints shaped like hub models load, sample, train and export: a tokenizer without a pad token (Llama 3),
several EOS ids in the generation config (Llama 3, Qwen), a chat template that adds a default system prompt
(Qwen 2.5), and tied embeddings (small Llama, Qwen, Gemma). Each is the session's tiny policy rewritten locally
with ``save_pretrained``, so no hub is needed and each test takes seconds.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from fit_helpers import fit_moving_every_parameter
from rollout_checks import chat_prompts, greedy_reference, set_noised_weights
from tiny_run import cli_config, make_module
from tokenizers import AddedToken
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from spiral_lit.errors import PathNotFoundError, find_user_error
from spiral_lit.prompts import PromptConfig, PromptRenderer
from spiral_lit.reliability.callbacks import export_policy
from spiral_lit.rollout import SamplingConfig, make_engine
from spiral_lit.runtime.models import PolicyConfig, load_policy
from spiral_lit.tasks import ChainSumTask
from spiral_lit.tools.export import export_checkpoint
from spiral_lit.training.data import ProblemDataModule

BACKENDS = ("kv_cache", "hf")
"""The in-process rollout backends: hooks on the policy's ``lm_head`` steer them."""

Edit = Callable[[PreTrainedModel, PreTrainedTokenizerBase], None]


def _variant(source: Path, out: Path, edit: Edit) -> Path:
    """The model in ``source`` with ``edit`` applied to its model and tokenizer, saved to ``out``."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    edit(model, tokenizer)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _noised(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` with noised weights in place: varied traces and no greedy near-ties (rollout_checks)."""
    set_noised_weights(model, {k: v.clone() for k, v in model.named_parameters()}, seed=0)
    return model.eval()


# ----------------------------------------------------------------------------- no pad token
def _drop_pad(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    tokenizer.pad_token = None
    model.config.pad_token_id = None
    model.generation_config.pad_token_id = None


@pytest.fixture(scope="module")
def no_pad_dir(tiny_policy, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _variant(tiny_policy.path, tmp_path_factory.mktemp("no_pad"), _drop_pad)


def test_a_tokenizer_without_pad_token_gets_its_eos_as_pad(no_pad_dir: Path) -> None:
    assert AutoTokenizer.from_pretrained(no_pad_dir).pad_token_id is None  # the checkpoint really has none
    model, tokenizer = load_policy(PolicyConfig(str(no_pad_dir)))
    assert tokenizer.pad_token_id == tokenizer.eos_token_id is not None
    assert model.generation_config.pad_token_id == tokenizer.eos_token_id
    assert tokenizer.padding_side == "left"


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_pad_token_left_padded_rollouts_equal_unpadded_greedy(no_pad_dir: Path, backend: str) -> None:
    """The pad id is the EOS id: left padding with it must not end or change a shorter prompt's trace."""
    model, tokenizer = load_policy(PolicyConfig(str(no_pad_dir)))
    model = _noised(model)
    prompts = chat_prompts(tokenizer)
    engine = make_engine(backend, model, tokenizer, 64)
    out = engine.generate(prompts, n=1, sampling=SamplingConfig(max_new_tokens=6, temperature=0.0), seed=0)
    for prompt, (completion,) in zip(prompts, out, strict=True):
        assert completion.token_ids == greedy_reference(model, tokenizer, prompt, 6)


def test_without_pad_token_a_short_spiral_fit_moves_every_parameter(no_pad_dir: Path, tmp_path: Path) -> None:
    module = make_module(no_pad_dir)
    data = ProblemDataModule(module.task, batch_size=2, heldout_size=4, eval_batch_size=4)
    scalars = fit_moving_every_parameter(module, data, str(tmp_path), max_steps=2)
    assert all(torch.isfinite(torch.tensor(scalars["train/loss"])))


# ----------------------------------------------------------------------------- several EOS ids
EXTRA_EOS = {"<|endoftext|>": True, "<|eom|>": False}
"""Further EOS tokens and whether each is a special token (some checkpoints list plain added tokens as EOS)."""


def _several_eos(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    tokenizer.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in EXTRA_EOS.items()])
    model.resize_token_embeddings(len(tokenizer))
    extra = tokenizer.convert_tokens_to_ids(list(EXTRA_EOS))
    model.generation_config.eos_token_id = [*extra, tokenizer.eos_token_id]  # the tokenizer's EOS last
    model.config.eos_token_id = model.generation_config.eos_token_id


@pytest.fixture(scope="module")
def several_eos(
    tiny_policy, tmp_path_factory: pytest.TempPathFactory
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, Path]:
    path = _variant(tiny_policy.path, tmp_path_factory.mktemp("several_eos"), _several_eos)
    model, tokenizer = load_policy(PolicyConfig(str(path)))
    return _noised(model), tokenizer, path


class ForceOnStep:
    """lm_head forward hook: every id in ``forbid`` is forbidden, except ``force``, forced in row 0 at call ``step``."""

    def __init__(self, forbid: list[int], force: int, step: int) -> None:
        self.forbid, self.force, self.step, self.calls = forbid, force, step, 0

    def __call__(self, module: torch.nn.Module, inputs: object, logits_BTV: torch.Tensor) -> torch.Tensor:
        self.calls += 1  # call 1 is the prefill, which picks the first new token
        logits_BTV = logits_BTV.clone()
        logits_BTV[:, -1, self.forbid] = -1e4
        if self.calls == self.step:
            logits_BTV[0, -1, self.force] = 1e4
        return logits_BTV


def test_several_eos_ids_survive_loading(several_eos) -> None:
    model, tokenizer, _ = several_eos
    eos = model.generation_config.eos_token_id
    assert isinstance(eos, list) and len(eos) == 3 and tokenizer.eos_token_id in eos


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("token", ["<|im_end|>", *EXTRA_EOS])
def test_rollouts_stop_on_each_eos_id_and_drop_it_from_the_text(several_eos, backend: str, token: str) -> None:
    model, tokenizer, _ = several_eos
    eos_ids = list(model.generation_config.eos_token_id)
    force = tokenizer.convert_tokens_to_ids(token)
    engine = make_engine(backend, model, tokenizer, 64)
    handle = model.lm_head.register_forward_hook(ForceOnStep(eos_ids, force, step=3))
    try:
        sampling = SamplingConfig(max_new_tokens=7)
        (group,) = engine.generate(chat_prompts(tokenizer)[:1], n=2, sampling=sampling, seed=0)
    finally:
        handle.remove()
    stopped, running = group
    assert (stopped.finish_reason, stopped.num_tokens, stopped.token_ids[-1]) == ("stop", 3, force)
    assert token not in stopped.text
    assert stopped.text == tokenizer.decode(stopped.token_ids[:-1], skip_special_tokens=True)
    assert (running.finish_reason, running.num_tokens) == ("length", 7)
    assert not set(eos_ids) & set(running.token_ids)


def test_an_eos_that_is_a_plain_added_token_is_dropped_from_candidates(several_eos) -> None:
    """Candidates reach the aggregation prompt as their decoded text: no EOS in it, special token or not."""
    _, tokenizer, _ = several_eos
    renderer = PromptRenderer(tokenizer, PromptConfig(), ChainSumTask().answer_instruction)
    for token in ["<|im_end|>", *EXTRA_EOS]:
        ids = [*tokenizer.encode("12+34=46", add_special_tokens=False), tokenizer.convert_tokens_to_ids(token)]
        assert renderer.truncate_candidate(ids) == "12+34=46"


def test_several_eos_ids_are_exported(several_eos, tmp_path: Path) -> None:
    """The list of EOS ids, and each EOS as a special token, reach what other tools load."""
    model, tokenizer, _ = several_eos
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.generation_config.eos_token_id == model.generation_config.eos_token_id
    plain = AutoTokenizer.from_pretrained(tmp_path)
    assert plain.decode(plain.encode("7<|eom|>", add_special_tokens=False), skip_special_tokens=True) == "7"


# ----------------------------------------------------------------------------- a default system prompt
DEFAULT_SYSTEM = "You are a helpful assistant."
SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set rest = messages[1:] %}"
    "{% else %}{% set system = '" + DEFAULT_SYSTEM + "' %}{% set rest = messages %}{% endif %}"
    "<|im_start|>system\n{{ system }}<|im_end|>\n"
    "{% for message in rest %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen 2.5's shape: a system block always, the default one unless the messages bring their own."""


@pytest.fixture(scope="module")
def system_tokenizer(tiny_policy, tmp_path_factory: pytest.TempPathFactory) -> PreTrainedTokenizerBase:
    def set_template(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        tokenizer.chat_template = SYSTEM_TEMPLATE

    path = _variant(tiny_policy.path, tmp_path_factory.mktemp("system"), set_template)
    return load_policy(PolicyConfig(str(path)))[1]


def _prompt_texts(tokenizer: PreTrainedTokenizerBase, config: PromptConfig) -> list[str]:
    """The search prompt and an aggregation prompt of one problem, decoded from the ids the renderer gives."""
    task = ChainSumTask()
    renderer = PromptRenderer(tokenizer, config, task.answer_instruction)
    problem = task.problem(0, "train")
    candidates = [problem.solution or "", *task.wrong_solutions(problem, 2, random.Random(0))]
    prompts = [renderer.search(problem), renderer.aggregation_from_texts(problem, candidates, random.Random(0))]
    return [tokenizer.decode(ids) for ids in prompts]


@pytest.mark.parametrize("system_prompt", [None, "You add numbers."])
def test_prompts_hold_one_system_block(system_tokenizer, system_prompt: str | None) -> None:
    """Without ``prompts.system_prompt`` the template's default appears; with it, ours replaces the default."""
    expected = system_prompt or DEFAULT_SYSTEM
    for text in _prompt_texts(system_tokenizer, PromptConfig(system_prompt=system_prompt)):
        assert text.count("<|im_start|>system\n") == 1
        assert text.startswith(f"<|im_start|>system\n{expected}<|im_end|>\n<|im_start|>user\n")
        assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert text.count(DEFAULT_SYSTEM) == (system_prompt is None)


# ----------------------------------------------------------------------------- tied embeddings
def _tied(model: torch.nn.Module) -> bool:
    """Whether the output layer shares the input embedding's storage."""
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def _logits(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    ids = torch.tensor([chat_prompts(tokenizer)[0]])
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_tied_embeddings_stay_tied_through_training_and_export(tiny_policy, tmp_path: Path) -> None:
    module = make_module(tiny_policy.path)
    data = ProblemDataModule(module.task, batch_size=2, heldout_size=4, eval_batch_size=4)
    fit_moving_every_parameter(module, data, str(tmp_path / "fit"), max_steps=2)
    policy, tokenizer = module.policy, module.runtime.tokenizer
    assert policy.config.tie_word_embeddings and _tied(policy)
    assert "lm_head.weight" not in dict(policy.named_parameters())  # one parameter, trained once

    out = export_policy(module, tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert reloaded.config.tie_word_embeddings and _tied(reloaded)
    trained = policy.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    assert torch.equal(_logits(reloaded, tokenizer), _logits(policy, tokenizer))
    assert not torch.equal(_logits(reloaded, tokenizer), _logits(tiny_policy.model, tokenizer))  # it trained


def test_untied_embeddings_export_both_matrices(tiny_policy, tmp_path: Path) -> None:
    """The other layout: a separate output matrix is written and read back as its own."""

    def untie(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone() * 0.5)

    path = _variant(tiny_policy.path, tmp_path / "untied", untie)
    model, tokenizer = load_policy(PolicyConfig(str(path)))
    assert not _tied(model)
    model.save_pretrained(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert not _tied(reloaded)
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(_logits(reloaded, tokenizer), _logits(model, tokenizer))


# ----------------------------------------------------------------------------- a mistyped local path
TYPO = "runs/quickstrat/hf"


def _refuse_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the hub is probed or transformers is asked to load anything."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a mistyped local path reached the hub or transformers")

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", refuse)
    monkeypatch.setattr("spiral_lit.runtime.models.AutoTokenizer.from_pretrained", refuse)
    monkeypatch.setattr("spiral_lit.runtime.models.AutoModelForCausalLM.from_pretrained", refuse)


def test_a_mistyped_run_directory_fails_at_once_naming_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _refuse_downloads(monkeypatch)
    (tmp_path / "runs" / "quickstart" / "hf").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    with pytest.raises(
        PathNotFoundError, match=r"'runs/quickstrat/hf' does not exist; did you mean 'runs/quickstart/hf'"
    ):
        load_policy(PolicyConfig(TYPO))
    assert time.monotonic() - start < 1


def test_a_missing_path_without_a_close_name_ends_its_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    _refuse_downloads(monkeypatch)
    with pytest.raises(PathNotFoundError, match=r"'\./nowhere/model' does not exist\. It was read as a local path"):
        load_policy(PolicyConfig("./nowhere/model"))


def test_export_with_a_mistyped_base_model_fails_naming_it(
    tiny_policy, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``export --model.init_args.policy.path`` with a typo: refused before any model is built or downloaded."""
    _refuse_downloads(monkeypatch)
    config = cli_config(tiny_policy.path, tmp_path, verifier_workers=0)
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}}, checkpoint)
    start = time.monotonic()
    with pytest.raises(Exception) as raised:
        export_checkpoint(
            ["--config", str(config), "--model.init_args.policy.path", TYPO], str(checkpoint), tmp_path / "out"
        )
    error = find_user_error(raised.value)
    assert isinstance(error, PathNotFoundError) and repr(TYPO) in str(error)
    assert time.monotonic() - start < 10
    assert not (tmp_path / "out").exists()
