pytest_plugins = ["tests.redis_fixture"]
pytest_plugins += ["tests.postfix_fixture"]
pytest_plugins += ["tests.redis_ha_fixture"]
