"""Files: model-file discovery and import, example inputs, weights, SUGAR checkpoints, atomic writes."""
