"""The merging engine: tensors and datasets in, tensors and metrics out. No web, no database."""
