"""Framework-free core of the method: attention patterns, noising, joint loss, two-stream inputs.

Imports only torch and the standard library (tests/unit/test_import_boundaries.py), so both engines
and the tests share it.
"""
