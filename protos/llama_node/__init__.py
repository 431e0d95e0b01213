"""The llama_node protobuf packages."""
