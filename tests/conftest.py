pytest_plugins = ["tests.integration.glance_fixtures"]
