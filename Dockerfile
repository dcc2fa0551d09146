# The medtriage image (API and workers) that docker-compose.gpu.yml builds; Triton runs in
# NVIDIA's own image. The serving path only: no torch, no test tools.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MEDTRIAGE_HOME=/var/lib/medtriage

# libopenjp2-7: JPEG 2000 decoded at reduced resolution (glymur, preprocess/j2k.py).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libopenjp2-7 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY orchestrator ./orchestrator
COPY preprocess ./preprocess
RUN pip install . && rm -rf /src

RUN useradd --system --uid 10001 --home-dir /var/lib/medtriage --create-home medtriage
USER medtriage
WORKDIR /var/lib/medtriage
EXPOSE 8080 9200
CMD ["medtriage", "api"]
