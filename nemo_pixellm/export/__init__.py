"""Conversion between PixelLM checkpoints and Hugging Face formats."""
