"""The `rtrain eval` and `rtrain export` subcommands: small composition roots for a finished checkpoint
(layer 6, beside rtrain.cli, which imports them lazily). They read checkpoints; they never train."""
