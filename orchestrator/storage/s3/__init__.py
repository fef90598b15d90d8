"""S3 storage: ``source.S3Checkpoint`` reads inputs with ranged GETs, ``sink.S3Output``
writes merges with multipart uploads. Any S3-compatible endpoint works.

Settings come from ``StorageOptions`` (endpoint, region, addressing style, cache, tuning);
everything else, credentials above all, comes from boto3's own chain: the environment
(``AWS_ACCESS_KEY_ID``…, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``), a profile
(``AWS_PROFILE``) or the pod's role. No credential passes through these modules'
arguments, and no message it writes contains one.

Reading. The listing of a checkpoint's prefix gives every object's size and ETag in one
request, so headers cost one ranged GET each (two for a header over 64 KiB). A shard
announces every byte range it will read, in order (``prefetch``); neighbouring ranges of
a file are coalesced into requests of at most ``request_bytes``, fetched on a small
thread pool while at most ``readahead_bytes`` per input are held, and each later read is
served from those buffers, which are freed as the reads move past them. Every GET carries
``If-Match: <planned ETag>``, so an object replaced mid-merge is an error, not a silent
mix of two versions. ``bytes_read`` counts the bytes that came over the network.

Writing. ``open_write`` streams a file as a multipart upload whose parts go up in the
background while the merge produces the next ones; the object exists only once the upload
completes, and an exception aborts it. A killed process cannot abort its own upload: a
merge aborts the stale ones (``remove_partials``) while it holds the output's lock,
before its shards start. The ETag and checksums S3 returns for each upload go into the
shard's receipt, and a resume compares them with a HEAD.

Cache. With ``cache_dir``, fetched byte ranges are kept in a sparse local file per object
version (keyed by ETag), so merging the same inputs again reads them from disk.
Modules, one job each: ``client`` (references, boto3 clients and their errors),
``readahead`` (coalesced ranged GETs ahead of the reader), ``range_cache`` (fetched
ranges kept on local disk), ``source`` (reading a checkpoint), ``sink`` (writing a merge).
"""
