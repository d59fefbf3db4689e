# GPU clusters: NGC PyTorch carries Transformer Engine, flash-attn and Apex built against its torch.
# nemo_pixellm selects TE modules automatically when transformer_engine imports (model.use_te=null).
FROM nvcr.io/nvidia/pytorch:26.10-py3

WORKDIR /opt/nemo_pixellm
COPY requirements/ requirements/
COPY setup.py README.md ./
COPY nemo_pixellm/ nemo_pixellm/
COPY conf/ conf/
COPY launchers/ launchers/
COPY data_prep/ data_prep/

# The image's torch / TE / flash-attn / Apex stay as built by NVIDIA; the plugin's own pins go on top.
RUN pip install --no-cache-dir megatron-core==0.19.2 hydra-core==1.3.8 omegaconf==2.3.1 webdataset==1.0.2 \
        tokenizers==0.22.2 && \
    FAST_HADAMARD_TRANSFORM_FORCE_BUILD=TRUE pip install --no-cache-dir --no-build-isolation --no-deps \
        fast-hadamard-transform==1.1.0 && \
    pip install --no-cache-dir --no-deps megatron-bridge==0.6.2 nvidia-resiliency-ext==0.6.0 && \
    pip install --no-cache-dir --no-deps -e .

ENTRYPOINT ["python", "-m", "nemo_pixellm.train"]
CMD ["+stage=stage2"]
