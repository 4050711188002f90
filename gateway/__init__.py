"""The public REST API: the marketplace's only front door."""
