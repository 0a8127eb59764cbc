"""Subspec's own CPU kernels (C, compiled on first use) and their Python wrappers."""
