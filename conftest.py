"""Root conftest: shared fixtures live in one module per layer, each owned by that layer's tests."""

pytest_plugins = [
    "tests.fixtures_host",
    "tests.fixtures_runtime",
    "tests.fixtures_data",
    "tests.fixtures_deploy",
]
