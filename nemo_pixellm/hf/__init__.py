"""Hugging Face interop: parameter-name maps and configs between PixelLM's Megatron modules and transformers'
classes (``deepseek_v3``: the language model, ``siglip``: the vision tower), and the checkpoint-directory
reading both share. ``python -m nemo_pixellm.export`` is the command built on them."""
