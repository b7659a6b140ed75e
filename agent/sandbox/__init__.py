"""Embedded fakes of the outside world (platform, supplier) for the demo and the tests.

They speak the same wire protocols as the real services and can inject faults.
"""
