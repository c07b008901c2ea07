# gradtap's server image: a builder stage makes a virtual environment, a slim stage runs it.
#
#   docker build -t gradtap:cpu .                                    CPU torch (the default)
#   docker build --build-arg TORCH_VARIANT=cu128 -t gradtap:cu128 .  a CUDA build of torch
#   docker run --rm -p 127.0.0.1:50051:50051 -v "$PWD/model-repository:/models:ro" gradtap:cpu
#
# TORCH_VARIANT names a wheel index under https://download.pytorch.org/whl/ (cpu, cu126,
# cu128, ...); TORCH_INDEX_URL overrides the whole address, for a mirror. The torch version
# itself is the one constraints.txt pins, whichever index it comes from.
ARG TORCH_VARIANT=cpu

FROM python:3.11-slim-bookworm AS builder
ARG TORCH_VARIANT
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src

# torch first, in a layer of its own: it is most of the image, and changes only with the pin.
# Its own index alone, so that no package of the same name on PyPI can stand in for it.
COPY constraints.txt ./
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" -c constraints.txt torch

# Then gradtap and the rest of the server extra from PyPI; the torch above already satisfies
# the pin, so pip keeps it.
COPY pyproject.toml README.md ./
COPY proto/ proto/
COPY gradtap/ gradtap/
COPY server/ server/
COPY client/ client/
RUN pip install --no-cache-dir -c constraints.txt ".[server]" \
    && pip check


FROM python:3.11-slim-bookworm AS runtime
ARG TORCH_VARIANT
LABEL org.opencontainers.image.title="gradtap" \
      org.opencontainers.image.description="A gRPC service that returns the activations and gradients of a PyTorch model's intermediate nodes." \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.gradtap.torch-variant="${TORCH_VARIANT}"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# A fixed numeric uid, so that Kubernetes' runAsNonRoot can check it. /models belongs to it,
# so that a named volume mounted there starts out readable (and writable) by the server.
RUN groupadd --system --gid 10001 gradtap \
    && useradd --system --uid 10001 --gid gradtap --create-home --home-dir /home/gradtap \
       --shell /usr/sbin/nologin gradtap \
    && install --directory --owner=gradtap --group=gradtap --mode=0755 /models

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001
WORKDIR /home/gradtap
VOLUME ["/models"]
EXPOSE 50051

# Health is SERVING only once the models have loaded; torch's import and the seed models take
# a while on a cold start, hence the start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["gradtap", "health", "--address", "127.0.0.1:50051"]

# 0.0.0.0: in its own network namespace the server must listen on the container's interface,
# not on its loopback alone. What reaches it is decided where the port is published:
# docker-compose.yml publishes it on the host's loopback only.
ENTRYPOINT ["gradtap"]
CMD ["serve", "--host", "0.0.0.0", "--port", "50051", "--device", "auto", "--model-repository", "/models"]
