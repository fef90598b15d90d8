"""The cluster side: the Helm chart's work-pool job template and the checks that tell,
before a long merge starts, whether a Kubernetes cluster can run its shards.

Talks to Kubernetes with the ``kubernetes`` client; never imports Prefect (the work pool
and its worker are checked in ``flows.cluster``).
"""
