"""The local stack for trying mergefleet by hand; the tests reuse its S3 launcher."""
