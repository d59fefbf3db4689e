"""Training: Hydra config -> Bridge ConfigContainer, layout validation, the forward step, progress logging."""
