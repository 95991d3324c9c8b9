"""Integration tests: the sageLLM engine on this package (a package, so its conftest has its own name)."""
