"""Scenario suites: one module per family; every module here is imported by discovery.

Add a scenario by adding one ``register(Scenario(...))`` entry to the module of its family.
Modules whose names start with ``_`` hold shared helpers and are not scanned.
"""
