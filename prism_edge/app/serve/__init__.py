"""HTTP serving: JSON endpoints and the OpenAI-compatible API over a Cluster."""
