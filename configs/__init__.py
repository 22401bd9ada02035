"""Config files: one per family, each `get_config(arg) -> ml_collections.ConfigDict`."""
