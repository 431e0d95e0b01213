"""Version 1 of the llama-node wire format (generated stubs; do not edit by hand)."""
