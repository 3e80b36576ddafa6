"""Export any checkpoint as a Hugging Face directory (docs/algorithm.md §8.4).

    python -m spiral_lit export --config experiments/quickstart/spiral.yaml \
        --ckpt_path runs/quickstart/spiral/checkpoints/last.ckpt --out runs/quickstart/spiral/hf_last

The run's config rebuilds the module exactly as training built it (base policy, LoRA adapters if
``policy.lora`` is set), the checkpoint's weights are checked against it and loaded (weights-only), and
:func:`~spiral_lit.reliability.callbacks.export_policy` writes the model, tokenizer and chat template, loadable with
``AutoModelForCausalLM.from_pretrained``. A LoRA policy is written as its adapter, or merged into the base
weights with ``--merge_lora``. Further arguments override the config, as for ``python -m spiral_lit``
(e.g. ``--model.init_args.policy.path DIR`` if the base model moved).

``--out`` is checked before the model is built (:mod:`spiral_lit.reliability.output_paths`): it may be new, empty, or
an earlier export of ours; anything else needs ``--overwrite``, and it may never be or contain the
checkpoint, the config or the base model. The export is written beside it and renamed into place.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from spiral_lit.cli import PROG, run_alias
from spiral_lit.cli import main as cli_main
from spiral_lit.reliability.callbacks import export_policy
from spiral_lit.reliability.checkpointing import check_checkpoint_matches, load_checkpoint_file
from spiral_lit.reliability.output_paths import check_output

OUT: dict[str, Any] = {"what": "--out", "flag": "--overwrite"}


def _config_files(config_args: list[str]) -> list[str]:
    """The files given as ``--config X`` or ``--config=X``."""
    files = []
    for arg, following in zip(config_args, [*config_args[1:], ""], strict=True):
        if arg == "--config":
            files.append(following)
        elif arg.startswith("--config="):
            files.append(arg.partition("=")[2])
    return files


def export_checkpoint(
    config_args: list[str], ckpt_path: str, out: str | Path, merge_lora: bool = False, overwrite: bool = False
) -> Path:
    """Build the module from ``config_args`` (``--config X.yaml``, overrides), load ``ckpt_path``, export to ``out``.

    ``out`` is checked first (module docstring); ``overwrite`` replaces what it holds, never an input.
    """
    # Fails first, naming the path, if it is missing or unreadable; memory-mapped, so cheap for a large model.
    checkpoint = load_checkpoint_file(ckpt_path, mmap=True)
    inputs: list[tuple[str, str | Path | None]] = [("the checkpoint (--ckpt_path)", ckpt_path)]
    inputs += [("the config (--config)", f) for f in _config_files(config_args)]
    check_output(out, **OUT, overwrite=overwrite, protected=inputs)
    cli = cli_main(config_args, run=False)
    module = cli.model
    policy_path = getattr(getattr(module, "policy_config", None), "path", None)
    if policy_path is not None and Path(policy_path).expanduser().exists():  # a hub id is not a local input
        inputs.append(("the base model (model.init_args.policy.path)", policy_path))
        check_output(out, **OUT, overwrite=overwrite, protected=inputs)  # before its weights are loaded
    with cli.trainer.precision_plugin.module_init_context():
        module.configure_model()
    try:
        check_checkpoint_matches(checkpoint, module, ckpt_path)
        module.load_state_dict(checkpoint["state_dict"], strict=module.strict_loading)
        return export_policy(module, out, merge_lora, overwrite, protected=inputs, **OUT)
    finally:
        module.teardown("export")


def _flag(value: str) -> bool:
    """``--overwrite`` alone or ``--overwrite true/false``, as the other commands take it."""
    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"{value!r}: expected true or false (or --overwrite alone)")
    return value.lower() in ("true", "1", "yes")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog=f"{PROG} export",
        description="Write a checkpoint's policy as a Hugging Face directory (model, tokenizer, chat template).",
        epilog=f"Other arguments override the config, as for `{PROG} fit` (--model.init_args.policy.path).",
    )
    parser.add_argument("--config", required=True, help="The YAML of the run that wrote the checkpoint.")
    parser.add_argument("--ckpt_path", required=True, help="A .ckpt file written by that run.")
    parser.add_argument("--out", required=True, help="Output directory: new, empty or an earlier export of ours.")
    parser.add_argument(
        "--overwrite", nargs="?", const=True, default=False, type=_flag,
        help="Replace what --out holds even if spiral_lit did not write it (never the checkpoint, config or model).",
    )  # fmt: skip
    parser.add_argument("--merge_lora", action="store_true", help="Merge a LoRA adapter into the base weights.")
    args, overrides = parser.parse_known_args(argv)
    config_args = ["--config", args.config, *overrides]
    path = export_checkpoint(config_args, args.ckpt_path, args.out, args.merge_lora, args.overwrite)
    print(f"[spiral_lit] exported {args.ckpt_path} to {path}")
    return path


if __name__ == "__main__":
    run_alias("export", __spec__)
