"""Stand-alone tools: the tiny model, GGUF conversion, export of a checkpoint."""
