# syntax=docker/dockerfile:1
# One image for the Prefect worker, the flows, the shard pods and the chart's Prefect and
# MLflow servers. Dependencies come from the same hashed lock files as `make test`.
#
#   docker build -t REGISTRY/mergefleet:0.1.0 .                          # CUDA torch (GPU nodes)
#   docker build --build-arg TORCH=cpu -t REGISTRY/mergefleet:0.1.0-cpu .
#
# The base is pinned by tag and by digest (the multi-arch index of python:3.11.10-slim-bookworm);
# raise both together. The CUDA variant needs no CUDA base image: the torch wheels carry the
# CUDA libraries and the node's NVIDIA container runtime provides the driver.
ARG BASE_IMAGE=python:3.11.10-slim-bookworm@sha256:5148c0e4bbb64271bca1d3322360ebf4bfb7564507ae32dd639322e4952a6b16
FROM ${BASE_IMAGE}

# cuda or cpu: which torch lock file is installed
ARG TORCH=cuda

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/mergefleet \
    PATH=/opt/mergefleet/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/tmp \
    PREFECT_HOME=/tmp/.prefect \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/.matplotlib

RUN groupadd --system --gid 10001 mergefleet \
    && useradd --system --uid 10001 --gid mergefleet --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mergefleet \
    && python -m venv /opt/mergefleet

# Dependency layers first: they change only when a lock file does.
COPY requirements/runtime.lock requirements/torch-cpu.lock requirements/torch-cuda.lock /opt/requirements/
RUN case "${TORCH}" in cpu|cuda) ;; *) echo "TORCH must be cpu or cuda, not '${TORCH}'" >&2; exit 1 ;; esac \
    && pip install --require-hashes --no-deps -r "/opt/requirements/torch-${TORCH}.lock" \
    && pip install --require-hashes --no-deps -r /opt/requirements/runtime.lock

# Then the project itself, without dependencies (they are all above, pinned and hashed).
COPY . /opt/src
RUN pip install --no-deps /opt/src \
    && pip check \
    && python -c "import orchestrator.cluster.entrypoint, flows.merge_shard, mergefleet.cli, prefect_kubernetes" \
    && NUMBA_CACHE_DIR=/tmp/numba-check python -c "from orchestrator.methods.sort_order import compile_replay; compile_replay()" \
    && rm -rf /tmp/numba-check \
    && rm -rf /opt/src

USER 10001:10001
WORKDIR /tmp

# The worker and the servers answer on HTTP; a shard container has nothing to probe.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "orchestrator.cluster.entrypoint", "healthcheck"]

ENTRYPOINT ["python", "-m", "orchestrator.cluster.entrypoint"]
CMD ["python", "-m", "mergefleet", "--help"]
