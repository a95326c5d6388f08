"""Target descriptions (*.toml) shipped with edgecompile; see edgecompile/lowering/targets.py."""
