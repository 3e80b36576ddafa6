"""Loading the policy and making it runnable: model and tokenizer loading, path checks, LoRA, FSDP2
sharding, and the bundle of engine, prompts and verifier a run uses.
"""
