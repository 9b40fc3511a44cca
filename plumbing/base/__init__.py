"""The layer the lesson stands on: files, configs, tokenizers, data files, checks and the project's
errors. It imports nothing from the lesson and nothing from the layer above it (plumbing/)."""
