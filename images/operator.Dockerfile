# syntax=docker/dockerfile:1
# The operator image: kopf, TorchX, boto3, prometheus-client — never torch.
# It builds TorchX AppDefs from the workloads package's component functions,
# which import no torch at module level, so the whole distribution is installed
# with only the `operator` extra.
#
#   docker build -f images/operator.Dockerfile -t ghcr.io/noisy-student-operator/operator:0.1.0 .
#
# The tag must match the version in pyproject.toml (the chart's default tag).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY workloads/ workloads/
RUN pip install ".[operator]" \
 && if pip show torch >/dev/null 2>&1; then echo "torch must not be in the operator image" >&2; exit 1; fi

FROM ${PYTHON_IMAGE}
# A fixed numeric UID/GID so Kubernetes can verify runAsNonRoot; the chart's
# securityContext uses the same ids.
RUN groupadd --system --gid 10001 noisy \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin noisy
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
USER 10001:10001
EXPOSE 8080 8081
ENTRYPOINT ["noisy-student"]
CMD ["operator", "--all-namespaces"]
