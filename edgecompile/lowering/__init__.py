"""Per-target lowering: targets as data (TOML), the lowering steps they name, and one target's bundle folder."""
