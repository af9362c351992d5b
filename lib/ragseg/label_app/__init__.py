"""MONAI Label integration: typed config, infer task, strategy, re-indexing, datastore."""
