"""nemo_pixellm: PixelLM vision-language models as a Megatron-Core / Megatron-Bridge plugin.

Importing the package installs the CPU compatibility layer when (and only when) CUDA is absent.
"""

import warnings

# torch.cuda imports the deprecated pynvml shim that Megatron's dependencies pull in; its warning is noise.
warnings.filterwarnings("ignore", message="The pynvml package is deprecated", category=FutureWarning)

from nemo_pixellm import cpu_compat  # noqa: E402

cpu_compat.install()

__version__ = "0.1.0"

