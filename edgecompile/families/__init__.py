"""Model families: how each architecture is exported, where its sub-layers are, its reference semantics."""
