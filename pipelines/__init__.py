"""Where prunekit meets its users: shard filtering, generate wrappers, RAG components."""
