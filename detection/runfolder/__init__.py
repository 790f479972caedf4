"""The predict run folder's formats, below every writer and reader: layout, journal, lock, the
record schema, the maps and grids npz, and the format versions (`versions`)."""
