"""Shared pytest fixtures for the host layer's tests."""
