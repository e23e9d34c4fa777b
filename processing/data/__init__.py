"""Data sets as `datasets` builders (ChatPedes, MALS) with their shared annotation checks, and the
built-in SynthPedes generator (attributes and language, drawing, the attribute oracle)."""
