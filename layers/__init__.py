"""foveal.layers: nn.Modules built on foveal.kernels (attention layers, positional terms, padding)."""
