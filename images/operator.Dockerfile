# syntax=docker/dockerfile:1
# The operator image: kopf, TorchX, boto3, prometheus-client — never torch.
# It builds TorchX AppDefs from the workloads package's component functions,
# which import no torch at module level, so the whole distribution is installed
# with only the `operator` extra.
#
#   docker build -f images/operator.Dockerfile -t ghcr.io/noisy-student-operator/operator:0.2.0 .
#
# The tag must match the version in pyproject.toml (the chart's default tag);
# `scripts/images build` builds it with podman, without a registry.
ARG BASE_IMAGE=debian:bookworm-slim

# Debian's own Python (bookworm: 3.11), so that the base is one that
# debootstrap reproduces from the Debian mirror (scripts/images base), and the
# virtual environment everything is installed into.
FROM ${BASE_IMAGE} AS python
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# The requirements of the `operator` extra, read from pyproject.toml: the
# dependencies' cache key is this list, not the whole pyproject.toml.
FROM python AS requirements
COPY pyproject.toml /src/
RUN python3 -c 'import sys, tomllib; p = tomllib.load(open(sys.argv[1], "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"][sys.argv[2]]))' \
      /src/pyproject.toml operator >/requirements.txt

# The project itself as a wheel (pure Python; rebuilt on every source change).
FROM python AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY workloads/ workloads/
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && pip wheel --no-deps --wheel-dir /dist .

# The image: the dependencies are installed in place rather than copied from
# another stage, so that their gigabytes are one layer that podman neither
# copies nor hashes again on a rebuild.
FROM python
COPY --from=requirements /requirements.txt /requirements.txt
# The dependencies alone: this layer is rebuilt only when that list changes.
# The downloaded wheels stay in a cache mount as a plain directory, which pip
# fills with only what is missing (its HTTP cache keeps nothing when a proxy
# strips the caching headers). The optional secret `pip-ca` is a CA bundle to
# trust (a TLS-intercepting proxy), mounted for these steps only and never
# stored in the image.
RUN --mount=type=cache,id=noisy-student-pip,target=/root/.cache/pip \
    --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && pip download --dest /root/.cache/pip/wheels -r /requirements.txt \
 && pip install --no-index --find-links /root/.cache/pip/wheels -r /requirements.txt \
 && if pip show torch >/dev/null 2>&1; then echo "torch must not be in the operator image" >&2; exit 1; fi
# A fixed numeric UID/GID so Kubernetes can verify runAsNonRoot; the chart's
# securityContext uses the same ids.
RUN groupadd --system --gid 10001 noisy \
 && useradd --system --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin noisy
ENV PYTHONUNBUFFERED=1 \
    HOME=/tmp
# Copied rather than bind-mounted: podman's layer cache keys a COPY on the
# files' content but a RUN only on its text.
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --no-cache-dir --no-deps --no-index /tmp/dist/*.whl \
 && rm -rf /tmp/dist \
 && pip check \
 && python -c "import kopf, torchx, noisy_student_operator, noisy_student_workloads"
USER 10001:10001
EXPOSE 8080 8081
ENTRYPOINT ["noisy-student"]
CMD ["operator", "--all-namespaces"]
