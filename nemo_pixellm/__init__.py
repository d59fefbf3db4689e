"""nemo_pixellm: PixelLM vision-language models as a Megatron-Core / Megatron-Bridge plugin.

Importing the package changes nothing in torch, Megatron or Bridge. The entry points (train, evaluate, info,
export, launch) call ``nemo_pixellm.compat.enable()`` first; a library user does the same before building a
model (it checks the pinned versions and, without CUDA or Transformer Engine, applies the listed patches).
"""

__version__ = "0.1.0"
