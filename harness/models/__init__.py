"""Users' models: the factory contract, check-model, the layer-by-layer diagnosis and the recommendation."""
