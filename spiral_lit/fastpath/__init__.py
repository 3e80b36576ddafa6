"""Fast CPU paths that re-implement the Llama-family forward (Llama, Qwen2, Mistral): the fused decode step
of the kv_cache engine and the shared-prefix training forward, with their shared layers. Each checks that it
matches the model's own forward and refuses (falling back to it) where it cannot.
"""
