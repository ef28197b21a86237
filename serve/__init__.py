"""The inference service: a versioned model repository, dynamic batching, the KServe v2 HTTP API."""
