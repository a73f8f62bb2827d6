# CPU image of the serving service. The store is mounted as a volume at /store:
#   docker build -t agnews-serve .
#   docker run -p 8000:8000 -v $PWD/store:/store:ro agnews-serve
# Install steps are scripts/install.sh, the same recipe `make setup` and CI run.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    SERVICE_STORE=/store SERVICE_HOST=0.0.0.0 SERVICE_PORT=8000
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md ./
COPY scripts/ scripts/
COPY models/ models/
COPY service/ service/
COPY training/ training/
COPY benchmarks/ benchmarks/
RUN TORCH_INDEX_URL=$TORCH_INDEX_URL scripts/install.sh python \
    && rm -rf /root/.cache/pip \
    && useradd --create-home --uid 10001 app
USER app

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status == 200 else 1)"
CMD ["python", "-m", "service"]
