"""Benchmarks: methods side by side, the Hugging Face baseline, the bandwidth bounds."""
