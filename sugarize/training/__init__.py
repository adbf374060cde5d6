"""Training: the fine-tuning loop and data files, the dead-unit audit, the bundled digits data."""
