pytest_plugins = ["tests.fixtures.redis", "tests.fixtures.models", "tests.fixtures.llm"]
