"""nemo_pixellm: PixelLM vision-language models as a Megatron-Core / Megatron-Bridge plugin.

Importing the package installs the CPU compatibility layer when (and only when) CUDA is absent.
"""

from nemo_pixellm import cpu_compat

cpu_compat.install()

__version__ = "0.1.0"

