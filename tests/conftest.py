pytest_plugins = [
    # Before servers, which imports it (a plugin must be imported as one to be rewritten).
    "tests.fixtures.registry",
    "tests.fixtures.servers",
    "tests.fixtures.database",
    "tests.fixtures.platform",
]
