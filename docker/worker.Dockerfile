# tvforge Celery worker on a CUDA GPU. Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t tvforge-worker .
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TVFORGE_DATA_DIR=/var/lib/tvforge \
    TVFORGE_BLOB_DIR=/var/lib/tvforge/blobs \
    NUMBA_CACHE_DIR=/var/lib/tvforge/numba-cache \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

# PyPI's torch is the CUDA build. Installed alone first so this layer survives source changes.
RUN pip install torch torchvision

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
