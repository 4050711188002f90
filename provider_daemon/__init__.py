"""The GPU owner's agent: enrolls a machine, runs assigned jobs in containers, reports.

It ships alone to strangers' machines, so it imports no service package: it knows the
platform only through the wire contracts in `common` and the gateway's agent HTTP API.
"""
