from tests.reliability.conftest import corpus  # noqa: F401 (the shared training text)
