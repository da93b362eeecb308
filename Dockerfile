# cxr-audit-agent container: CUDA runtime base for the GPU path, non-root user, volumes for the
# spool, drafts, results and state, a health check on the health endpoint, the DICOM port exposed.
# RESEARCH USE ONLY - see DISCLAIMER.md and NOTICE. No model weights are baked in: mount a model
# folder and point a site profile at it (docs/models.md), or use an OpenAI-compatible server.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/data/hf-cache

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev dcmtk ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /app
COPY pyproject.toml README.md LICENSE NOTICE DISCLAIMER.md ./
COPY cxr_auditor ./cxr_auditor
COPY dicom_agent ./dicom_agent
COPY config ./config
# The default PyPI torch wheel is a CUDA build, which is what this image is for. Editable
# install: the agent reads config/agent.yaml and config/profiles/ beside its packages in /app.
RUN pip install --upgrade pip && pip install -e ".[models]"

COPY docker/agent.yaml /etc/cxr-agent/agent.yaml

RUN useradd --system --uid 10001 --create-home --home-dir /home/cxr cxr \
 && mkdir -p /data/spool /data/drafts /data/out /data/state /data/quarantine /data/profiles /data/hf-cache \
 && chown -R cxr:cxr /data
USER cxr

# /data/hf-cache is the Hugging Face hub cache (HF_HOME): keep it on a volume so a new container
# does not download the model again.
VOLUME ["/data/spool", "/data/drafts", "/data/out", "/data/state", "/data/hf-cache"]
# DICOM and health/metrics. EXPOSE publishes nothing: publish them on an interface of your
# choice (compose.yaml uses the host's loopback; `docker run -p 127.0.0.1:8080:8080 ...`).
EXPOSE 11112 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python3", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["cxr-agent"]
CMD ["serve", "--config", "/etc/cxr-agent/agent.yaml"]
