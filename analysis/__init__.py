"""From a study in MLflow to tables, importance and plots."""
