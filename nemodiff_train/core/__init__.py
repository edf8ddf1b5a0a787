"""Framework-free core of the method: attention patterns, noising, joint loss, two-stream inputs.

Imports only torch and the standard library (DESIGN.md), so both engines and the tests share it.
"""
