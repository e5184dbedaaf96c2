"""Scans on disk turned into ε/ω/χ maps (``nanobeam predict``): readers of the files beamlines
write, the chunked prediction that overlaps reading with the model, and the orientation check."""
