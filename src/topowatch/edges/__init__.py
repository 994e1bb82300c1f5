"""Edges: the narrow interfaces to the kernel and the outside world, each with a fake for tests."""
