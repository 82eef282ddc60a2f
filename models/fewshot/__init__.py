"""SEAL's few-shot domain (§4.1): ARC tasks, grid encoding, self-edit configs, augmentations,
test-time training and voting. Plain Python and torch, no Prefect or MLflow."""
