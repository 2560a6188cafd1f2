# syntax=docker/dockerfile:1
# omniq on the CPU: the media worker (ffmpeg comes from the imageio-ffmpeg wheel), the webhook, Flower and
# the CLI. The GPU worker's image is Dockerfile.cuda. Build: docker build -t omniq .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# torch and torchvision as one working pair, the same as the Makefile's TORCH_PACKAGES; CPU-only wheels
ARG TORCH_PACKAGES="torch==2.14.1 torchvision==0.29.1"
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/omniq && /opt/omniq/bin/pip install --upgrade pip
ENV PATH=/opt/omniq/bin:$PATH
# hadolint cannot see the pins inside TORCH_PACKAGES
# hadolint ignore=DL3013
RUN pip install --index-url "$TORCH_INDEX_URL" $TORCH_PACKAGES
WORKDIR /src
COPY pyproject.toml README.md ./
COPY pipeline ./pipeline
COPY workers ./workers
# the pinned torch pair already satisfies omniq's torch requirement, so pip keeps it
RUN pip install . && pip check

FROM ${PYTHON_IMAGE}
RUN useradd --create-home --uid 10001 --user-group omniq \
    && mkdir -p /home/omniq/.cache/huggingface /var/lib/omniq \
    && chown -R 10001:10001 /home/omniq /var/lib/omniq
COPY --from=build /opt/omniq /opt/omniq
COPY --chmod=0755 deploy/healthcheck.py /usr/local/bin/omniq-healthcheck
ENV PATH=/opt/omniq/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/omniq/.cache/huggingface
# numeric, so that a runtime can tell it is not root (user omniq)
USER 10001:10001
WORKDIR /home/omniq
ENTRYPOINT ["omniq"]
CMD ["--help"]
