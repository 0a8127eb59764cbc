"""Models and prompt sets from package registries: the catalogue, wheels, GGUF conversion."""
