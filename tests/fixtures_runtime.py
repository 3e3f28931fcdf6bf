"""Shared pytest fixtures for the runtime layer's tests."""
