"""PixelLM model components: Megatron-Core layer specs, the vision tower, the projector, the model and its provider."""
