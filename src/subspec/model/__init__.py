"""The decoder: architecture config, checkpoint reading, forward pass, layers, KV cache."""
