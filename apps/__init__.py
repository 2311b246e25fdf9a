"""The `mlxfam` command line and its chat app, built on the `mlxfam` library."""
