"""Hugging Face interop: parameter-name maps and configs between PixelLM's Megatron modules and transformers'
classes (``deepseek_v3``: the language model, ``siglip``: the vision tower), the checkpoint-directory reading
both share, and the whole exported VLM as a transformers model (``pixellm``: PixelLMForConditionalGeneration,
PixelLMProcessor). ``python -m nemo_pixellm.export`` is the command that writes what ``pixellm`` loads."""


def __getattr__(name):  # the transformers model loads transformers only when asked for
    if name in ("PixelLMConfig", "PixelLMForConditionalGeneration", "PixelLMProcessor"):
        from nemo_pixellm.hf import pixellm

        return getattr(pixellm, name)
    raise AttributeError(name)
