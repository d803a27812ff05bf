# tvforge API (also runs `tvforge migrate`). Build from the repository root:
#   docker build -f docker/api.Dockerfile -t tvforge-api .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TVFORGE_API_HOST=0.0.0.0 \
    TVFORGE_API_PORT=8000 \
    TVFORGE_DATA_DIR=/var/lib/tvforge \
    TVFORGE_BLOB_DIR=/var/lib/tvforge/blobs \
    NUMBA_CACHE_DIR=/var/lib/tvforge/numba-cache

# The API only inspects models on the CPU: the CPU wheels are gigabytes smaller than
# PyPI's CUDA build. Installed alone first so this layer survives source changes.
# Pinned to the versions the test suite ran with (torch 2.14 ships CUDA 12.6, 13.0 and 13.2 builds): unpinned, an
# index that stops building a line serves an older torch without a word.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1

WORKDIR /opt/tvforge
# .dockerignore keeps the context to what `pip install .` needs.
COPY . .
RUN pip install .

# Same UID as the worker image: both write the shared blob volume.
RUN useradd --system --uid 10001 --create-home tvforge \
    && mkdir -p /var/lib/tvforge/blobs \
    && chown -R tvforge /var/lib/tvforge
USER tvforge
WORKDIR /var/lib/tvforge

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ['TVFORGE_API_PORT'], timeout=4)"
CMD ["tvforge", "api"]
