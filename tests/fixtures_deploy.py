"""Shared pytest fixtures for the deploy layer's tests."""
