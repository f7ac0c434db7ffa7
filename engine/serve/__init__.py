"""`ragrt serve`: the FastAPI app over one Engine, its request schemas, the continuous batcher and the
Prometheus metrics. Needs the `[serve]` extra."""
