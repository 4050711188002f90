"""Buckets, file records and presigned URLs; the only package that holds storage keys."""
