-- One Postgres, two databases: Prefect's and MLflow's (run once, at the first start).
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
