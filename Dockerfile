# GPU clusters: NGC PyTorch carries torch, the CUDA libraries, Transformer Engine, flash-attn and Apex built
# against each other. nemo_pixellm selects TE modules automatically when transformer_engine imports (model.use_te=null).
#   docker build -t <registry>/nemo_pixellm:0.1.0 .      (then cluster.container_image in conf/cluster/<site>.yaml)
FROM nvcr.io/nvidia/pytorch:26.10-py3

# Lock entries the base image provides in its own build (torch, its CUDA wheels, triton): they stay as NVIDIA built them.
ARG NGC_PROVIDED="^(torch|torchvision|triton|nvidia-(cu|nccl|nvjitlink|nvshmem|nvtx)[a-z0-9-]*|cuda-[a-z-]+)=="

WORKDIR /opt/nemo_pixellm
COPY requirements/ requirements/
COPY setup.py README.md ./
COPY nemo_pixellm/ nemo_pixellm/
COPY conf/ conf/
COPY launchers/ launchers/
COPY data_prep/ data_prep/

# Every other pin of the project's lock, unresolved (--no-deps), as scripts/setup_env.sh installs it on CPU;
# then the two packages that script installs by hand, and the plugin itself (editable: conf/ stays beside it).
RUN grep -v -E "$NGC_PROVIDED" requirements/lock-cpu.txt > /tmp/lock-gpu.txt && \
    pip install --no-cache-dir --no-deps -r /tmp/lock-gpu.txt && \
    FAST_HADAMARD_TRANSFORM_FORCE_BUILD=TRUE pip install --no-cache-dir --no-build-isolation --no-deps \
        fast-hadamard-transform==1.1.0 && \
    pip install --no-cache-dir --no-deps nvidia-resiliency-ext==0.6.0 && \
    pip install --no-cache-dir --no-deps -e . && \
    python -c "import nemo_pixellm.train"

ENTRYPOINT ["python", "-m", "nemo_pixellm.train"]
CMD ["+stage=stage2"]
