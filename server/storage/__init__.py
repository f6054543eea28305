"""Weights from a URI to local bytes: S3 (parallel ranged GETs), HTTP(S) and local paths.

`uri` parses a storage URI, `settings` reads the S3 client settings KServe users already set,
`download` fetches one object's ranges in parallel into a `Sink`, `cache` keeps a node-local copy
keyed by ETag and size, and `pull` ties them together for `ember pull`. Importing this package
imports none of them (boto3 is loaded only where a client is built).
"""
