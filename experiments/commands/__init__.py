"""Sub-commands of the `talr` CLI, one module each."""
