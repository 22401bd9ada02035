"""Device meshes, logical-axis rule presets and multi-host initialisation."""
