"""Makes docs/conftest.py the module docs.conftest, apart from tests/conftest.py."""
