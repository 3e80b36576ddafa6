"""Load the shared policy (one causal LM for both roles) and build a tiny one locally.

``load_policy`` is the only place a model or tokenizer is read: a local directory or a
hub id through ``AutoModelForCausalLM`` / ``AutoTokenizer``, so the tiny model that the
quickstart builds travels the same code path as Qwen or Llama checkpoints. Before anything is
read, :func:`check_policy_files` checks the path (:mod:`spiral_lit.runtime.model_files`: what counts as
local, which files a directory needs, one quick probe of the hub instead of minutes of retries).

``build_tiny_policy`` makes a small Llama and a byte-level BPE tokenizer trained on the
task's own text (digits kept as single tokens, so arithmetic stays learnable), with a
ChatML chat template, and writes both with ``save_pretrained``. Llama, not Qwen2: with a
``qwen2`` config ``AutoTokenizer`` returns Qwen's tokenizer class, which replaces the
pre-tokenizer (machine-facts.md).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from spiral_lit.errors import UserError
from spiral_lit.runtime.lora import LoraSettings
from spiral_lit.runtime.model_files import check_local_path, check_policy_dir, hub_access, looks_local
from spiral_lit.runtime.sharding import Fsdp2Settings

DType = Literal["float32", "bfloat16", "float16", "auto"]

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
KEY = "model.init_args.policy.path"


@dataclass
class PolicyConfig:
    """Where the shared generator/aggregator policy comes from and how it is loaded."""

    path: str
    """A local directory written by ``save_pretrained`` or a Hugging Face hub id."""
    dtype: DType = "float32"
    """Weight dtype at load time; mixed precision is the Trainer's ``precision``."""
    attn_implementation: str = "sdpa"
    """``eager``, ``sdpa`` or ``flash_attention_2``."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint; off unless you trust its author."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) for hub ids."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of keeping them (less memory, about
    a third more compute). Under ``FSDPStrategy`` use the strategy's ``activation_checkpointing_policy``."""
    lora: LoraSettings | None = None
    """Train low-rank adapters instead of all weights (needs peft: ``pip install 'spiral_lit[lora]'``)."""
    fsdp2: Fsdp2Settings = field(default_factory=Fsdp2Settings)
    """Sharding under ``trainer.strategy: ModelParallelStrategy`` (mixed precision, resharding)."""

    def __post_init__(self) -> None:
        if not self.path:
            raise UserError(f"{KEY}: give a local model directory or a hub id")
        if looks_local(self.path):
            check_local_path(self.path, KEY)


def check_policy_files(config: PolicyConfig, tokenizer: bool = True, model: bool = True) -> dict[str, Any]:
    """Check that ``config.path`` can load, before anything is read; returns the ``from_pretrained`` arguments.

    A local directory must hold the tokenizer files (with ``tokenizer``) and the config and weights (with ``model``);
    a hub id must be a repository we can reach or have cached (:mod:`spiral_lit.runtime.model_files`). When the hub is
    unreachable and the model cached, ``local_files_only`` is added, so transformers does not retry the hub for
    minutes before it uses the cache.
    """
    kwargs: dict[str, Any] = {"trust_remote_code": config.trust_remote_code, "revision": config.revision}
    if not _check_local(config, tokenizer, model) and hub_access(config.path, config.revision, KEY) == "cached_only":
        kwargs["local_files_only"] = True
    return kwargs


def _check_local(config: PolicyConfig, tokenizer: bool, model: bool) -> bool:
    """Check a local ``config.path`` (False for a hub id); transformers too takes an existing directory as local."""
    directory = Path(config.path).expanduser()
    if not directory.is_dir() and not looks_local(config.path):
        return False
    check_local_path(config.path, KEY)
    check_policy_dir(directory, KEY, tokenizer, model, config.trust_remote_code)
    return True


def load_policy(config: PolicyConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The policy model and its tokenizer; checks the tokenizer can render chats and stop.

    A tokenizer without a pad token pads with its EOS (left padding and masks keep it out of every trace), and
    every EOS id of the generation config decodes as a special token (:func:`mark_eos_special`).
    """
    kwargs = check_policy_files(config, tokenizer=True, model=False)
    tokenizer = _tokenizer(config, kwargs)  # its chat template and EOS are checked before the weights are looked for
    _check_local(config, tokenizer=False, model=True)
    if kwargs.get("local_files_only"):
        # transformers' look-up of a PEFT adapter config does not inherit local_files_only and retries the hub.
        kwargs["adapter_kwargs"] = {"local_files_only": True}
    dtype = "auto" if config.dtype == "auto" else getattr(torch, config.dtype)
    model = AutoModelForCausalLM.from_pretrained(
        config.path, dtype=dtype, attn_implementation=config.attn_implementation, **kwargs
    )
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    mark_eos_special(tokenizer, eos_ids(model, tokenizer))
    if config.gradient_checkpointing:
        enable_activation_checkpointing(model)
    return model, tokenizer


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a trace, as the rollout engines read them: the generation config's (one or a list, as
    Llama 3 and Qwen ship) and the tokenizer's EOS."""
    eos = model.generation_config.eos_token_id
    listed = eos if isinstance(eos, list) else [eos]
    return sorted({i for i in [*listed, tokenizer.eos_token_id] if i is not None})


def mark_eos_special(tokenizer: PreTrainedTokenizerBase, ids: Iterable[int]) -> None:
    """Mark each EOS id that is an added but not a special token as special.

    Completions and candidates are decoded with ``skip_special_tokens``; an EOS the checkpoint lists as a plain added
    token would otherwise stay in the completion text and in the aggregation prompt's candidates. Matching such a
    token in text is unchanged (added tokens are matched whole either way); only decoding drops it.
    """
    added = getattr(tokenizer, "added_tokens_decoder", {})  # mistral-common's tokenizer has no added tokens
    plain = [added[i] for i in ids if i in added and not added[i].special]
    if plain:
        tokenizer.add_tokens([_as_special(token) for token in plain], special_tokens=True)


def _as_special(token: AddedToken) -> AddedToken:
    """``token`` with ``special=True`` and its matching options kept."""
    return AddedToken(
        token.content,
        single_word=token.single_word,
        lstrip=token.lstrip,
        rstrip=token.rstrip,
        normalized=token.normalized,
        special=True,
    )


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer in backward (``policy.gradient_checkpointing``).

    Non-reentrant checkpointing: it works with frozen inputs (LoRA) and inside FSDP2-sharded layers.
    """
    if not model.supports_gradient_checkpointing:
        raise ValueError(f"policy.gradient_checkpointing: {type(model).__name__} does not support it")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def load_tokenizer(config: PolicyConfig) -> PreTrainedTokenizerBase:
    """The policy's tokenizer with left padding (generation) and a pad token."""
    return _tokenizer(config, check_policy_files(config, tokenizer=True, model=False))


def _tokenizer(config: PolicyConfig, kwargs: dict[str, Any]) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(config.path, **kwargs)
    if tokenizer.chat_template is None:
        raise UserError(
            f"{KEY}={config.path!r}: the tokenizer has no chat template; spiral_lit renders both prompts "
            "through it. Use an instruct/chat checkpoint or set `chat_template` in its tokenizer_config.json"
        )
    if tokenizer.eos_token_id is None:
        raise UserError(f"{KEY}={config.path!r}: the tokenizer has no EOS token, so generation cannot stop")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def context_length(config: PolicyConfig) -> int | None:
    """The longest sequence the policy was built for, read from its config alone (no weights): the checks of
    token budgets run before any model is loaded (docs/algorithm.md §8.4). None when the config does not say, or is
    not a plain model config (a LoRA adapter directory). A missing directory, or a hub id neither reachable nor
    cached, raises (:func:`check_policy_files`)."""
    kwargs = check_policy_files(config, tokenizer=False, model=False)
    try:
        model_config = AutoConfig.from_pretrained(config.path, **kwargs)
    except (OSError, ValueError):
        return None
    text_config = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass
class TinyModelConfig:
    """Size of the locally built Llama; defaults learn 5-term 3-digit sums on a laptop CPU in minutes."""

    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); None = ``num_heads``. Fewer shrink the KV cache that every
    decode step reads, what bounds a step on a CPU where no two rows share a prompt (recursive aggregation,
    evaluation; benchmarks/README.md, "Fewer key/value heads")."""
    max_position_embeddings: int = 1024
    vocab_size: int = 320
    """Target BPE vocabulary (byte alphabet + merges + special tokens)."""
    seed: int = 0
    """Seed of the weight initialisation."""

    def __post_init__(self) -> None:
        for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "max_position_embeddings"):
            if getattr(self, key) < 1:
                raise UserError(f"tiny.{key} must be >= 1, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            raise UserError(
                f"tiny.hidden_size ({self.hidden_size}) must be divisible by tiny.num_heads ({self.num_heads})"
            )
        if self.num_kv_heads is not None and (self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads):
            raise UserError(
                f"tiny.num_kv_heads ({self.num_kv_heads}) must be >= 1 and divide tiny.num_heads ({self.num_heads})"
            )
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise UserError(f"tiny.vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (byte alphabet + specials)")


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE with one token per digit and a ChatML template, trained in about a second."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token=None,
        padding_side="left",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_policy(
    out_dir: str | Path, corpus: Iterable[str], config: TinyModelConfig | None = None
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Train a tokenizer on ``corpus``, initialise a small Llama, save both to ``out_dir``."""
    config = config or TinyModelConfig()
    tokenizer = train_tokenizer(corpus, config.vocab_size)
    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads or config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = LlamaForCausalLM(model_config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model, tokenizer
