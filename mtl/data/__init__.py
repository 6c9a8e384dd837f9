"""YAML -> task -> episodes: task-file schema, registry, source readers, decoding, caches, episodes."""
