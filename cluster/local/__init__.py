"""Start and stop a local Ray head and a local MLflow server (sqlite) for development and tests."""
