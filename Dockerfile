# The platform services (gateway, auth_service, storage_service, provider_registry,
# scheduler): one image, the command picks the service.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml alembic.ini ./
COPY common common
COPY gateway gateway
COPY auth_service auth_service
COPY storage_service storage_service
COPY provider_registry provider_registry
COPY scheduler scheduler
COPY provider_daemon provider_daemon
COPY migrations migrations
COPY gpumarket gpumarket
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --uid 10001 --create-home gpumarket
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER gpumarket
EXPOSE 8000
CMD ["uvicorn", "gateway.app:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]
