# The platform services (gateway, auth_service, storage_service, provider_registry,
# scheduler) and the operator CLI (`gpumarket migrate`, `gpumarket admin ...`): one image,
# the command picks the process (see compose.yaml). No secret is baked in: they come at
# run time from GPUMARKET_* variables or files in /run/secrets (common/settings.py).
#
#   docker build -t gpumarket:latest .
#
# Plain Dockerfile syntax (no BuildKit-only features), so docker-compose 1.x and podman
# build it too.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# A virtualenv at the same path in both stages: the runtime stage copies it whole, with no
# wheels or pip cache left behind in a layer.
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first, from pyproject.toml alone, so a code change does not reinstall them.
# Every one ships manylinux wheels for CPython 3.11: no compiler needed.
COPY pyproject.toml ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > requirements.txt \
 && pip install -r requirements.txt
COPY common common
COPY gateway gateway
COPY auth_service auth_service
COPY storage_service storage_service
COPY provider_registry provider_registry
COPY scheduler scheduler
COPY billing billing
COPY provider_daemon provider_daemon
COPY migrations migrations
COPY gpumarket gpumarket
RUN pip install --no-deps . && pip check

FROM ${PYTHON_IMAGE}
# A fixed uid/gid, so host-side ownership (volumes, secret files) can be planned.
RUN groupadd --gid 10001 gpumarket \
 && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin gpumarket
COPY --from=build /opt/venv /opt/venv
# The bytecode was compiled at install time; nothing needs to write at run time.
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 10001:10001
WORKDIR /home/gpumarket
EXPOSE 8000
CMD ["uvicorn", "gateway.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
