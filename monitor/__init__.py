"""callmon monitor: ingest, metrics, rules and incidents (see issue 3)."""
