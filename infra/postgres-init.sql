-- One PostgreSQL server, three databases: the ledger (POSTGRES_DB), Prefect's and MLflow's.
CREATE DATABASE prefect OWNER dpops;
CREATE DATABASE mlflow OWNER dpops;
-- The ledger's pipeline role (placeholder password, like the others); `dpops ledger upgrade
-- --grant dpops_pipeline` (the ledger-migrate service) grants it what the ledger writes.
CREATE ROLE dpops_pipeline LOGIN PASSWORD 'dpops-pipeline';
