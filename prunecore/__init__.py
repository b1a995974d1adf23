"""Shared tools: embedding, faiss clustering and search, selection utilities, devices."""
