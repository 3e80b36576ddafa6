"""Export any checkpoint as a Hugging Face directory (issue 7).

    python -m spiral_lit.export --config experiments/quickstart/spiral.yaml \
        --ckpt_path runs/quickstart/spiral/checkpoints/last.ckpt --out runs/quickstart/spiral/hf_last

The run's config rebuilds the module exactly as training built it (base policy, LoRA adapters if
``policy.lora`` is set), the checkpoint's weights are checked against it and loaded (weights-only), and
:func:`~spiral_lit.callbacks.export_policy` writes the model, tokenizer and chat template, loadable with
``AutoModelForCausalLM.from_pretrained``. A LoRA policy is written as its adapter, or merged into the base
weights with ``--merge_lora``. Further arguments override the config, as for ``python -m spiral_lit``
(e.g. ``--model.init_args.policy.path DIR`` if the base model moved).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

from spiral_lit.callbacks import export_policy
from spiral_lit.checkpointing import check_checkpoint_matches, load_checkpoint_file


def export_checkpoint(config_args: list[str], ckpt_path: str, out: str | Path, merge_lora: bool = False) -> Path:
    """Build the module from ``config_args`` (``--config X.yaml``, overrides), load ``ckpt_path``, export to ``out``."""
    from spiral_lit.cli import main as cli_main

    checkpoint = load_checkpoint_file(ckpt_path)  # fails first, naming the path, if it is missing or unreadable
    # LightningCLI warns when given args while sys.argv holds other ones (here: this script's own).
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = cli_main(config_args, run=False)
    module = cli.model
    with cli.trainer.precision_plugin.module_init_context():
        module.configure_model()
    try:
        check_checkpoint_matches(checkpoint, module, ckpt_path)
        module.load_state_dict(checkpoint["state_dict"], strict=module.strict_loading)
        return export_policy(module, out, merge_lora=merge_lora)
    finally:
        module.teardown("export")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(
        prog="python -m spiral_lit.export",
        description="Write a checkpoint's policy as a Hugging Face directory (model, tokenizer, chat template).",
        epilog="Other arguments override the config, as for `python -m spiral_lit` (--model.init_args.policy.path).",
    )
    parser.add_argument("--config", required=True, help="The YAML of the run that wrote the checkpoint.")
    parser.add_argument("--ckpt_path", required=True, help="A .ckpt file written by that run.")
    parser.add_argument("--out", required=True, help="Output directory (replaced atomically if it exists).")
    parser.add_argument("--merge_lora", action="store_true", help="Merge a LoRA adapter into the base weights.")
    args, overrides = parser.parse_known_args(argv)
    path = export_checkpoint(["--config", args.config, *overrides], args.ckpt_path, args.out, args.merge_lora)
    print(f"[spiral_lit] exported {args.ckpt_path} to {path}")
    return path


if __name__ == "__main__":
    main()
