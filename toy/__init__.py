"""The toy world and its tiny checkpoints: the embedded stand-ins for the hub, not the method."""
