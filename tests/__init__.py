"""prunekit's test suite: one folder per package (``tests/<package>/...``); shared helpers in
``tests/helpers``, shared fixtures in the ``conftest.py`` files."""
