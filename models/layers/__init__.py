"""Building blocks: norms, positions, attention and MLP sublayers."""
