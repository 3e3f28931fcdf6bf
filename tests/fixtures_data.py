"""Shared pytest fixtures for the data layer's tests."""
