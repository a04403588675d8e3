"""fusion-seg."""
