# tvforge Celery worker on a CUDA GPU. Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t tvforge-worker .
# PyTorch's CUDA wheels carry their own CUDA runtime and cuDNN (nvidia-* packages): the image needs no CUDA base,
# only the host's driver, which the NVIDIA container toolkit mounts for a container given a GPU.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TVFORGE_DATA_DIR=/var/lib/tvforge \
    TVFORGE_BLOB_DIR=/var/lib/tvforge/blobs \
    NUMBA_CACHE_DIR=/var/lib/tvforge/numba-cache

# The CUDA 12.6 build, which CUDA's minor-version compatibility runs on any 12.x driver (525 and later). PyPI's
# default torch is now a CUDA 13 build, which needs driver 580 or later: on an older host torch would find no GPU
# and a worker left on `auto` would run everything on the CPU. Installed alone first so this layer survives source
# changes.
# Pinned to the versions the test suite ran with (torch 2.14 ships CUDA 12.6, 13.0 and 13.2 builds): unpinned, an
# index that stops building a line serves an older torch without a word.
RUN pip install --index-url https://download.pytorch.org/whl/cu126 torch==2.14.1 torchvision==0.29.1

WORKDIR /opt/tvforge
# .dockerignore keeps the context to what `pip install .` needs.
COPY . .
RUN pip install .

# Same UID as the API image: both write the shared blob volume.
RUN useradd --system --uid 10001 --create-home tvforge \
    && mkdir -p /var/lib/tvforge/blobs \
    && chown -R tvforge /var/lib/tvforge
USER tvforge
WORKDIR /var/lib/tvforge

CMD ["tvforge", "worker"]
