"""Wire contracts shared by every service: message schemas, subjects, settings, DB base.

This package holds contracts, not logic, and imports no service package.
"""
