"""Where shards run. ``base.ShardRunner`` is the interface; each runner is one module:

- ``orchestrator.runners.threads.WorkerThreads``: threads of this process (``mergefleet
  merge``: no interpreter or torch to start per worker);
- ``orchestrator.runners.processes.WorkerProcesses``: local worker processes, each with its
  own memory (a worker that dies is reported as such);
- ``flows.runners.inline.InlineTasks``: Prefect tasks in the flow's process
  (``fleet.target: inline``);
- ``flows.runners.deployment.DeploymentRuns``: runs of the merge-shard deployment on a
  Prefect work pool, a ``process`` pool here or a ``kubernetes`` pool in a cluster
  (``fleet.target: deployment``).

The Prefect runners live in ``flows/`` because the library never imports Prefect.
"""
