"""Target descriptions (*.toml) shipped with edgecompile; see edgecompile/targets.py."""
