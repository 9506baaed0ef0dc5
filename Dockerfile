# sdft: one image for every way of running the job (docker run, Kubernetes Job, JobSet).
# Needs BuildKit (RUN --mount). No "# syntax=" line: BuildKit would fetch that frontend from a
# registry, and the one built into Docker 20.10+ reads this file as it is.
#
# The base only has to provide glibc, Python 3.11 from apt and the driver hook: the CUDA libraries
# come inside torch's wheels (see docker/requirements.lock). It is pinned by tag and digest and is a
# build arg, so an air-gapped build can pass a locally made Debian/Ubuntu image instead
# (make image does: scripts/build-image.sh).
ARG BASE_IMAGE=nvidia/cuda:13.0.0-base-ubuntu22.04@sha256:c08986c5ea16a41bba86f4ac08b327861c7b7d05dee7fae0648dcf0e964bf6e4
# Where the locked wheels come from: "index" (PyPI; plain docker build) or "wheelhouse" (the folder
# .work/image/wheels that docker/lock.py --wheelhouse fills on the host, for a build that cannot
# reach PyPI or verify its TLS). Either way pip checks every file against the lock's hashes.
ARG DEPS=index

FROM ${BASE_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive
# Versions come from the base image's apt snapshot; pinning them would tie the Dockerfile to one
# distribution release and break the BASE_IMAGE override.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 tini ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# Build stage: a venv with the locked dependencies, then the package itself.
FROM python AS build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Dependencies get their own layer before the code, so a code change reuses the ~5 GB below.
# --require-hashes: every wheel (torch and its nvidia-* wheels included) must match the lock.
ARG LOCK_FILE=docker/requirements.lock
COPY ${LOCK_FILE} /tmp/requirements.lock

FROM build AS deps-index
RUN pip install --no-cache-dir --no-deps --require-hashes -r /tmp/requirements.lock

# The wheelhouse is bind-mounted for this one step, so its 3 GB of wheels never become a layer.
FROM build AS deps-wheelhouse
RUN --mount=type=bind,source=.work/image/wheels,target=/wheelhouse \
    pip install --no-cache-dir --no-deps --require-hashes --no-index --find-links /wheelhouse -r /tmp/requirements.lock

# BuildKit builds only the deps stage that DEPS names (a stage of this file, so no tag: DL3006).
# hadolint ignore=DL3006
FROM deps-${DEPS} AS package
COPY pyproject.toml README.md /src/
COPY job/ /src/job/
# setuptools is in the lock, so no unpinned build backend is fetched.
RUN pip install --no-cache-dir --no-deps --no-build-isolation /src

# Runtime stage: the venv, the entrypoint, nothing to compile with.
FROM python AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://github.com/sdft/sdft
LABEL org.opencontainers.image.title="sdft" \
      org.opencontainers.image.description="Fine-tune Stable Diffusion (DreamBooth or LoRA) as a batch job" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}"

# A fixed numeric user, so Kubernetes' runAsNonRoot can verify it without a passwd lookup.
# /work and the HF cache are world-writable with the sticky bit, like /tmp: docker run --tmpfs
# copies the mode of the folder it covers (not its owner), so a plain --tmpfs /work is writable
# by uid 10001, and by any uid a platform picks (OpenShift).
RUN groupadd --gid 10001 sdft \
 && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin sdft \
 && mkdir -p /cache/huggingface /work \
 && chown 10001:10001 /cache/huggingface /work \
 && chmod 1777 /cache/huggingface /work
COPY --from=package /opt/venv /opt/venv
COPY --chmod=0755 entrypoint.sh /app/entrypoint.sh

# Everything the job writes goes to /tmp, HF_HOME or the work dir, so the root filesystem can be
# read-only (Kubernetes mounts emptyDirs there; with docker run use --tmpfs or volumes).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/cache/huggingface \
    SDFT_WORK_DIR=/work
WORKDIR /work
USER 10001:10001

# tini is PID 1: it forwards SIGTERM to the entrypoint's exec'd process and reaps zombies
# (dataloader workers, accelerate children). No HEALTHCHECK: a batch job's health is its exit code.
ENTRYPOINT ["/usr/bin/tini", "--", "/app/entrypoint.sh"]
CMD ["run"]
