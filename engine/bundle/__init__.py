"""The bundle on disk: the manifest schema (the one contract with `ragrt.export`), file checksums,
corpus versions swapped in by one rename, and the atomic writes they rely on."""
