"""Thin stage wrappers: read inputs, call the library, write outputs atomically."""
